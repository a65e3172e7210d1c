"""Shared-prompt forward vs the unshared concatenated forward (issue 12 item 1), CPU.

Run: .venv/bin/python bench/shared_prompt.py [--repeats 3] [--threads 1] [--smoke]

A random-init GPT-2 with GPT-2 small's vocabulary (50257) and head size (64), fewer and narrower
layers so the run stays under two minutes on a shared 2-core machine, scores preference batches
of `--pairs` pairs: one prompt of `--prompt` tokens per pair, responses of up to `--response`
tokens (lengths differ, so there is right padding), n_way 2 (DPO) and 3 (ADPO). Two uses:

- policy: forward + backward of a weighted sum of the log-probs (a training step without the
  optimizer);
- reference: forward under torch.no_grad (the frozen reference / inner toxic model).

Each cell is the best of ``--repeats`` runs after one warm-up: wall time (perf_counter) and the
process's CPU time (less disturbed by other processes). ``max |diff|`` is the largest difference
between the two paths' log-probs (a sanity check; tests/test_shared_prompt.py is the real one).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from functools import partial

import torch
from common import markdown_table

from safealign.logps import concatenated_forward
from safealign.models import build_tiny_gpt2
from safealign.shared_prompt import pack, prompt_split, shared_prompt_forward


@dataclass(frozen=True)
class _Vocab:
    """What `build_tiny_gpt2` reads from a tokenizer."""

    size: int
    eos_token_id: int = 0
    pad_token_id: int = 0

    def __len__(self) -> int:
        return self.size


def make_batch(pairs: int, n_way: int, prompt: int, response: int, vocab: int, seed: int = 0):
    """Rows [chosen; rejected(; toxic)], prompt shared per pair, responses of differing length."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, vocab, (pairs, prompt), generator=gen)
    rows = []
    for k in range(n_way):
        for i in range(pairs):
            size = response - (3 * k + 5 * i) % (response // 4 + 1)  # 3/4 .. all of `response`
            rows.append((prompts[i], torch.randint(1, vocab, (size,), generator=gen)))
    width = prompt + response
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for r, (p, y) in enumerate(rows):
        ids[r, : prompt + len(y)] = torch.cat([p, y])
        labels[r, prompt : prompt + len(y)] = y
        mask[r, : prompt + len(y)] = 1
    return ids, mask, labels


def timed(fn, repeats: int) -> tuple[float, float, torch.Tensor]:
    """Best wall and CPU seconds of `repeats` calls after one warm-up, and the last result."""
    out = fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu), out


def step(forward, model, batch, n_way: int, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        out = forward(model, *batch, n_way)
        logps = torch.stack([out.chosen, out.rejected] + ([out.toxic] if n_way == 3 else []))
        if grad:
            model.zero_grad(set_to_none=True)
            (logps * torch.linspace(1.0, -1.0, n_way)[:, None]).sum().backward()
    return logps.detach()


def positions(batch, n_way: int) -> str:
    """Token positions through the body and lm_head, unshared -> shared."""
    ids, _, labels = batch
    packed = pack(ids, labels, *prompt_split(*batch, n_way))
    body, head = packed.input_ids.numel(), packed.labels.numel()
    return f"n_way {n_way}: body {ids.numel()} -> {body}, lm_head {ids.numel()} -> {head}"


def row(model, batch, n_way: int, grad: bool, a: argparse.Namespace) -> list[str]:
    """One table line: the same batch through the unshared and the shared forward."""
    runs = [
        timed(partial(step, f, model, batch, n_way, grad), a.repeats)
        for f in (concatenated_forward, shared_prompt_forward)
    ]
    (w0, c0, y0), (w1, c1, y1) = runs
    use = "policy fwd+bwd" if grad else "reference fwd"
    return [use, str(n_way), f"{1e3 * w0:.0f}", f"{1e3 * w1:.0f}", f"{w0 / w1:.2f}",
            f"{1e3 * c0:.0f}", f"{1e3 * c1:.0f}", f"{c0 / c1:.2f}",
            f"{(y0 - y1).abs().max().item():.1e}"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("pairs", 2), ("prompt", 192), ("response", 48), ("n-layer", 4),
                          ("n-embd", 256), ("vocab", 50257), ("repeats", 3), ("threads", 1)]:  # fmt: skip
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    a = ap.parse_args()
    if a.smoke:
        a.prompt, a.response, a.n_layer, a.n_embd, a.vocab, a.repeats = 16, 8, 1, 64, 500, 1
    torch.set_num_threads(a.threads)
    model = build_tiny_gpt2(
        _Vocab(a.vocab), n_layer=a.n_layer, n_head=a.n_embd // 64, n_embd=a.n_embd,
        n_positions=a.prompt + a.response, seed=0,
    )  # fmt: skip
    print(
        f"GPT-2 {a.n_layer} layers x {a.n_embd} wide, vocab {a.vocab}; {a.pairs} pairs, prompt "
        f"{a.prompt}, responses <= {a.response} tokens; {a.threads} thread(s), best of {a.repeats}"
    )
    header = ["use", "n_way", "unshared ms", "shared ms", "wall x", "unshared CPU ms",
              "shared CPU ms", "CPU x", "max |diff|"]  # fmt: skip
    for n_way in (2, 3):
        print(positions(make_batch(a.pairs, n_way, a.prompt, a.response, a.vocab), n_way))
    rows = [
        row(model, make_batch(a.pairs, n_way, a.prompt, a.response, a.vocab), n_way, grad, a)
        for grad in (True, False)
        for n_way in (2, 3)
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
