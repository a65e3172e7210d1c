#!/usr/bin/env bash
# GPU acceptance check (issue 9): strategies ddp, deepspeed_z2, deepspeed_z3, fsdp, fsdp2 x
# SFT, DPO, ADPO on model=tiny_llama, on every visible GPU (1-8). Prints a markdown table
# (step-0 KL, final loss, export OK, tokens/s, peak memory); exit status 1 if any cell fails.
#   scripts/gpu_check.sh [--dry-run] [--strategies ddp,fsdp2] [--methods sft,dpo] [--cells ddp/sft]
#                        [--devices N] [--trainer gpu_v100] [--max-steps 8] [--timeout 900]
#                        [--out outputs/gpu_check] [key=value ...]
# All options: scripts/gpu_check.sh --help. Docs: docs/cluster.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
[[ -x .venv/bin/python && -z ${VIRTUAL_ENV:-} ]] && PYTHON=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=${WANDB_MODE:-disabled}
exec "$PYTHON" scripts/gpu_check.py "$@"
