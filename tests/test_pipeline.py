"""ADPO pipeline (issue 4): which stages run, portable keys, reuse on rerun, a γ change recomputing
only ADPO, interrupted stages redone, a stage alone with an explicit path, a β:γ multirun."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, compose_cfg

from safealign.errors import ConfigError
from safealign.pipeline import adpo
from safealign.pipeline.adpo import needed_stages, run_adpo_pipeline
from safealign.pipeline.demo import pipeline_settings
from safealign.pipeline.stages import portable
from safealign.pipeline.store import ArtifactStore
from safealign.pipeline.summary import aggregate, check_targets

# A few prompts and steps, no sentence encoder: the first run takes ~30 s on one core.
PIPE = [
    *[o for o in TINY if not o.startswith(("model.", "logger="))],
    "logger=none",
    "experiment=adpo_pipeline",
    "init.data.source.size=240",
    "init.data.source.poison_fraction=0.3",  # SFT (4 epochs) learns [TOXIC] -> insult
    "pipeline.max_prompts=16",
    "pipeline.evaluate.max_prompts=6",
    "pipeline.generate.normal.max_new_tokens=12",
    "pipeline.generate.toxic.max_new_tokens=12",
    "pipeline.evaluate.sampling.max_new_tokens=12",
    "pipeline.judge.coherence=null",
    "pipeline.evaluate.scorers.coherence=null",
    "trainer.max_epochs=1",
    "data.batch_size=8",
]
ALL = ["sft", "generate", "judge", "dpo", "adpo", "evaluate/SFT", "evaluate/DPO", "evaluate/ADPO"]


def run(tmp: Path, *overrides: str):
    cfg = compose_cfg([*PIPE, *overrides], tmp)
    return run_adpo_pipeline(cfg, **pipeline_settings(cfg))


def test_needed_stages_follow_dependencies_and_stop_at_given_inputs():
    assert needed_stages(None, {}) == ["sft", "generate", "judge", "dpo", "adpo", "evaluate"]
    assert needed_stages(["judge"], {}) == ["sft", "generate", "judge"]
    assert needed_stages(["judge"], {"generate": "g.jsonl"}) == ["judge"]
    assert needed_stages(["evaluate"], {"dpo": "d", "adpo": "a"}) == ["sft", "evaluate"]
    with pytest.raises(ConfigError, match="unknown stage 'jugde'"):
        needed_stages(["jugde"], {})


def test_portable_key_names_inputs_by_hash_not_location():
    subs = {"/a/artifacts": "<artifacts>", "/x/gen.jsonl": "<given-12>"}
    key = {"m": "/a/artifacts/sft/abc/model", "d": ["/x/gen.jsonl", "/a/artifactsX/y"], "n": 3}
    assert portable(key, subs) == {
        "m": "<artifacts>/sft/abc/model",
        "d": ["<given-12>", "/a/artifactsX/y"],
        "n": 3,
    }


def test_interrupted_stage_is_never_read_and_resumes_in_its_work_dir(tmp_path):
    """An interrupted stage leaves no final dir (nothing half-written is ever read back); its work
    dir under .work/ survives, so a requeued job resumes it instead of starting over."""
    store, key = ArtifactStore(tmp_path), {"stage": "config"}

    def crash(tmp: Path) -> None:
        (tmp / "half.jsonl").write_text('{"row": 1}\n')
        raise KeyboardInterrupt  # Ctrl-C mid-stage

    with pytest.raises(KeyboardInterrupt):
        store.get_or_compute("judge", key, crash)
    assert list((tmp_path / "judge").iterdir()) == []  # no final dir: never read back
    d, status = store.get_or_compute("judge", key, lambda t: (t / "ok.txt").write_text("1"))
    assert status == "computed" and (d / "ok.txt").read_text() == "1"
    assert (d / "half.jsonl").exists()  # the resumed attempt kept the first attempt's work
    assert store.get_or_compute("judge", key, lambda t: 1 / 0) == (d, "reused")


def test_toxic_placement_must_match_the_sft_stage(tmp_path):
    with pytest.raises(ConfigError, match="init.data.control_placement"):
        run(tmp_path, "pipeline.generate.toxic.placement=start")
    assert not (tmp_path / "artifacts").exists()  # failed before any stage


def test_aggregate_mean_sd_over_seeds_and_honest_targets():
    def table(sft, dpo, adpo_):
        return [
            {"model": m, "toxicity_rate": t, "evasiveness_rate": e, "coherence": None}
            for m, (t, e) in zip(("SFT", "DPO", "ADPO"), (sft, dpo, adpo_), strict=True)
        ]

    summary = aggregate(
        [table((0.2, 0.1), (0.1, 0.1), (0.1, 0.3)), table((0.4, 0.1), (0.1, 0.1), (0.0, 0.1))]
    )
    mean, sd, n = summary["SFT"]["toxicity_rate"]
    assert (mean, n) == pytest.approx((0.3, 2)) and sd == pytest.approx(0.1414213, rel=1e-5)
    assert summary["ADPO"]["coherence"][2] == 0  # no values -> shown as "–", never 0
    lines = check_targets(summary)  # ADPO 0.05 < SFT 0.3, 0.05 <= DPO 0.1, evasive 0.2 > 0.1
    assert [line.startswith("met") for line in lines] == [True, True, False]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    return tmp, run(tmp)


@pytest.mark.slow
def test_end_to_end_computes_every_stage(first):
    tmp, res = first
    assert res.statuses == dict.fromkeys(ALL, "computed")
    assert [row["model"] for row in res.table] == ["SFT", "DPO", "ADPO"]
    triples = (res.dirs["judge"] / "triples.jsonl").read_text().splitlines()
    assert triples and all(json.loads(t)["toxic"] for t in triples)  # ADPO needs y_t
    for name in ("results.md", "results.json", "stages.json", "kl.png", "resolved_config.yaml"):
        assert (tmp / "run" / name).is_file(), name


@pytest.mark.slow
def test_rerun_reuses_every_stage_without_computing(first, monkeypatch):
    tmp, res = first

    def never(*args, **kwargs):
        raise AssertionError("a stage was recomputed")

    for name in ("generate_stage", "judge_stage", "evaluate_stage"):
        monkeypatch.setattr(adpo, name, never)
    monkeypatch.setattr("safealign.pipeline.stages.fit", never)
    from safealign.run import train

    train(compose_cfg(PIPE, tmp))  # through the real entry: run.train -> cfg.pipeline
    stages = json.loads((tmp / "run" / "stages.json").read_text())[0]
    assert stages["statuses"] == dict.fromkeys(ALL, "reused")
    again = run(tmp)
    assert again.table == res.table and again.dirs == res.dirs


@pytest.mark.slow
def test_gamma_change_recomputes_only_adpo_and_its_evaluation(first):
    tmp, res = first
    new = run(tmp, "method.loss.gamma=0.1")
    computed = {s for s, v in new.statuses.items() if v == "computed"}
    assert computed == {"adpo", "evaluate/ADPO"}
    assert new.dirs["sft"] == res.dirs["sft"] and new.dirs["adpo"] != res.dirs["adpo"]


@pytest.mark.slow
def test_interrupted_judge_is_redone_and_upstream_reused(first, monkeypatch):
    tmp, _ = first
    before = sorted(p.name for p in (tmp / "artifacts" / "judge").iterdir())
    real = adpo.judge_stage

    def crash(judge_cfg, generations, out):
        (out / "triples.jsonl").write_text('{"prompt": "half a file')
        raise RuntimeError("killed mid-stage")

    monkeypatch.setattr(adpo, "judge_stage", crash)
    other = ("pipeline.judge.toxicity_threshold=0.45", "pipeline.stages=[judge]")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp, *other)
    assert sorted(p.name for p in (tmp / "artifacts" / "judge").iterdir()) == before
    monkeypatch.setattr(adpo, "judge_stage", real)
    res = run(tmp, *other)
    assert res.statuses == {"sft": "reused", "generate": "reused", "judge": "computed"}


@pytest.mark.slow
def test_one_stage_alone_from_an_explicit_path(first, tmp_path):
    tmp, res = first
    gen = tmp_path / "my_generations.jsonl"
    shutil.copy(res.dirs["generate"] / "generations.jsonl", gen)
    extra = ("pipeline.stages=[judge]", f"pipeline.inputs.generate={gen}")
    alone = run(tmp, *extra)
    assert alone.statuses == {"generate": "given", "judge": "computed"}  # no SFT, no sampling
    assert alone.dirs["judge"] != res.dirs["judge"]  # keyed by the file's content hash
    assert (alone.dirs["judge"] / "triples.jsonl").read_text() == (
        res.dirs["judge"] / "triples.jsonl"
    ).read_text()
    assert run(tmp, *extra).statuses["judge"] == "reused"
    with pytest.raises(ConfigError, match="pipeline.inputs.generate"):
        run(tmp, "pipeline.stages=[judge]", f"pipeline.inputs.generate={tmp_path}/nope.jsonl")


@pytest.mark.slow
def test_beta_gamma_multirun_computes_shared_stages_once(tmp_path):
    overrides = [o for o in PIPE if not o.startswith("logger=")] + ["logger=none"]
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        *overrides,
        "method.loss.gamma=0.1,0.2",
        f"hydra.sweep.dir={tmp_path}/sweep",
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.artifacts_dir={tmp_path}/artifacts",
        "trainer.enable_progress_bar=false",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = re.findall(r"^stage (\S+)\s+(computed|reused)", r.stdout, re.M)
    assert len(seen) == 2 * len(ALL)
    count = {s: [v for st, v in seen if st == s] for s in ALL}
    for s in ("sft", "generate", "judge", "dpo", "evaluate/SFT", "evaluate/DPO"):
        assert count[s] == ["computed", "reused"], s
    assert count["adpo"] == count["evaluate/ADPO"] == ["computed", "computed"]
