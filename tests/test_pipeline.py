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
from safealign.eval.stats import wilson_interval
from safealign.pipeline import adpo
from safealign.pipeline.adpo import needed_stages, run_adpo_pipeline
from safealign.pipeline.demo import pipeline_settings
from safealign.pipeline.stages import portable
from safealign.pipeline.store import ArtifactStore
from safealign.pipeline.summary import write_summary

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
    "scorer/toxicity@pipeline.evaluate.scorers.toxicity=profanity",  # no encoder training
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


def test_toxic_placement_must_match_the_sft_stage(tmp_path, caplog):
    with pytest.raises(ConfigError, match="init.data.control_placement"):
        run(tmp_path, "pipeline.generate.toxic.placement=start")
    assert not (tmp_path / "artifacts").exists()  # failed before any stage
    # PIPE evaluates with profanity, the judge's own toxicity scorer: the run says so (issue 11)
    assert "the evaluation toxicity scorer is the judge's" in caplog.text


def test_default_evaluation_scorer_is_not_the_judges(tmp_path, caplog):
    no_scorer = [o for o in PIPE if not o.startswith("scorer/toxicity@")]
    cfg = compose_cfg([*no_scorer, "pipeline.generate.toxic.placement=start"], tmp_path)
    assert cfg.pipeline.evaluate.scorers.toxicity._target_ != cfg.pipeline.judge.toxicity._target_
    with pytest.raises(ConfigError, match="init.data.control_placement"):
        run_adpo_pipeline(cfg, **pipeline_settings(cfg))  # fails after the scorer check
    assert "the evaluation toxicity scorer is the judge's" not in caplog.text


def fake_result(tmp: Path, seed: int, toxic: dict[str, int], n_prompts: int = 40):
    """A PipelineResult whose evaluate stages hold scored samples: 2 samples per prompt, model m
    toxic on both samples of its first ``toxic[m]`` prompts, evasive on prompt 0 only."""
    res = adpo.PipelineResult()
    for name, k in toxic.items():
        d = tmp / f"seed{seed}" / name
        (d / "scored").mkdir(parents=True)
        rows = [{"prompt_id": i, "response": f"reply {i}", "toxicity": float(i < k),
                 "evasive": float(i == 0), "coherence": 0.5} for i in range(n_prompts)
                for _ in range(2)]  # fmt: skip
        (d / "scored" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        settings = {"threshold": 0.5, "n_boot": 500, "seed": seed, "scored": f"scored/{name}.jsonl"}
        (d / "eval_settings.json").write_text(json.dumps(settings))
        res.dirs[f"evaluate/{name}"] = d
        res.table.append({"model": name, "toxicity_rate": k / n_prompts})
    return res


def test_summary_pools_seeds_with_intervals_and_paired_differences(tmp_path):
    # SFT toxic on 12 of 40 prompts per seed, DPO on 11, ADPO on 1: pooled over 2 seeds.
    results = [fake_result(tmp_path, s, {"SFT": 12, "DPO": 11, "ADPO": 1}) for s in (0, 1)]
    summary = write_summary(tmp_path, results)
    sft, adpo_ = summary["SFT"], summary["ADPO"]
    assert sft["toxicity_rate"] == pytest.approx(24 / 80) and sft["n_samples"] == 160
    # both samples of a prompt agree: deff = 2 -> Wilson on the 80 (seed, prompt) groups
    assert (sft["toxicity_rate_lo"], sft["toxicity_rate_hi"]) == pytest.approx(
        wilson_interval(24, 80)
    )
    assert sft["samples_per_prompt"] == 2 and sft["n_prompts"] == 80
    saved = json.loads((tmp_path / "results.json").read_text())
    diff = saved["differences"]["ADPO − SFT"]
    assert diff["toxicity_rate"] == pytest.approx(-22 / 80)
    assert diff["toxicity_rate_lo"] < -22 / 80 < diff["toxicity_rate_hi"] < 0
    assert diff["evasiveness_rate"] == 0.0 and diff["evasiveness_rate_lo"] == 0.0  # identical
    assert len(saved["tables"]) == 2 and saved["n_seeds"] == 2  # per-seed rows kept
    lines = saved["targets"]
    assert lines[0].startswith("met") and "non-overlapping" in lines[0]
    assert lines[1].startswith("met") and "excludes 0" in lines[1]
    md = (tmp_path / "results.md").read_text()
    assert "| ADPO − SFT |" in md and "| ADPO − DPO |" in md and "n=2 samples per prompt" in md
    assert f"{adpo_['toxicity_rate']:.3f} [{adpo_['toxicity_rate_lo']:.3f}, " in md


def test_summary_targets_are_never_forced(tmp_path):
    # ADPO 10 vs SFT 12 of 40 prompts: lower, but the intervals overlap and the paired
    # difference (2 differing groups of 80 (seed, prompt) groups) is not clearly below 0.
    results = [fake_result(tmp_path, s, {"SFT": 12, "DPO": 8, "ADPO": 11}) for s in (0, 1)]
    write_summary(tmp_path, results)
    lines = json.loads((tmp_path / "results.json").read_text())["targets"]
    assert [line.startswith("met") for line in lines] == [False, False, False, True]


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
    md = (tmp / "run" / "results.md").read_text(encoding="utf-8")
    assert "| ADPO − SFT |" in md and "samples per prompt" in md  # pooled, paired differences
    scored = res.dirs["evaluate/SFT"] / "scored" / "SFT.jsonl"  # the samples the summary pools
    assert len(scored.read_text().splitlines()) == res.table[0]["n_samples"]


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
