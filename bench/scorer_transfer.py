"""Held-out accuracy of the context scorer (scorer/toxicity=context) vs alt-profanity-check.

    nice -n 10 .venv/bin/python bench/scorer_transfer.py             # ~10 min on 2 cores, cold
    nice -n 10 .venv/bin/python bench/scorer_transfer.py --no-loco   # skip the 5 extra trainings

Every set below is data the scorer never trained on (docs/scorers.md):
(a) DiaSafety test; (b) DiaSafety leave-one-category-out: a head trained WITHOUT category k
(train and val) scored on the test rows of k, an unseen kind of unsafety; (c) HH-RLHF
harmless-base test pairs: share of pairs whose rejected final reply scores above the chosen one
(ties count 1/2; no training on HH); (d) XSTest prompts scored as replies to an empty context
(unsafe vs safe-looking-but-safe prompts); (e) the demo's built-in test split (seed 0; the scorer
trained on seed 1 of the same templates, so this one is near-domain, not transfer).
A LOCO row's "seen" figure is the AUROC on the same rows of the head trained on every category.
Columns: AUROC, accuracy at 0.5 and at the threshold chosen on DiaSafety val (each scorer its
own), expected calibration error (10 equal-width bins). Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from safealign.data.builtin import BuiltinSpec
from safealign.data.sources import load_diasafety, load_hh_rlhf, load_xstest
from safealign.eval.context_head import choose_threshold
from safealign.eval.context_train import DIASAFETY_CATEGORIES
from safealign.eval.scorers import ProfanityScorer
from safealign.io import write_json
from safealign.types import UNSAFE

ROOT = Path(__file__).resolve().parents[1]


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width bins of |mean p - mean y| * share."""
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(p[idx == b].mean() - y[idx == b].mean()) * np.mean(idx == b)
                     for b in range(bins) if (idx == b).any()))  # fmt: skip


def metrics(p: np.ndarray, y: np.ndarray, t: float) -> dict:
    return {"auroc": float(roc_auc_score(y, p)), "acc@0.5": float(np.mean((p >= 0.5) == y)),
            "acc@t": float(np.mean((p >= t) == y)), "ece": ece(p, y), "n": int(len(y))}  # fmt: skip


def labelled(examples) -> tuple[list[str], list[str], np.ndarray]:
    y = np.array([int(ex.label == UNSAFE) for ex in examples])
    return [ex.context for ex in examples], [ex.response for ex in examples], y


def context_scorer(args, exclude: tuple[str, ...] = ()):
    node = OmegaConf.load(ROOT / "conf" / "scorer" / "toxicity" / "context.yaml")
    node.data_dir, node.artifacts_dir = str(args.data_dir), str(args.artifacts_dir)
    node.cache_dir, node.exclude_categories = str(args.cache_dir), list(exclude)
    return instantiate(node)


def score_sets(scorers: dict, args) -> dict:
    """name -> {scorer -> metrics} for sets (a), (c), (d), (e)."""
    dia = load_diasafety(args.data_dir / "diasafety")
    val, test = labelled(dia.val), labelled(dia.test)
    builtin = labelled(BuiltinSpec().dialogues().test)
    xs = load_xstest(args.data_dir / "xstest" / "xstest_prompts.csv")
    hh = [p for p in load_hh_rlhf(args.data_dir / "hh_rlhf_harmless_base", split="test").test
          if p.chosen.strip() != p.rejected.strip()]  # fmt: skip
    out: dict = {"diasafety_test": {}, "builtin_test": {}, "xstest": {}, "hh_pairs": {}}
    for name, s in scorers.items():
        t = choose_threshold(s.score(val[1], val[0]), val[2])  # each scorer's own val threshold
        p = s.score(test[1], test[0])
        out["diasafety_test"][name] = metrics(p, test[2], t)
        cats = np.array([ex.topic for ex in dia.test])  # per category: LOCO's "seen" reference
        out.setdefault("seen_auroc", {})[name] = {
            k: float(roc_auc_score(test[2][cats == k], p[cats == k])) for k in DIASAFETY_CATEGORIES
        }
        out["builtin_test"][name] = metrics(s.score(builtin[1], builtin[0]), builtin[2], t)
        y = np.array([int(r["label"] == UNSAFE) for r in xs])
        out["xstest"][name] = metrics(s.score([r["text"] for r in xs], [""] * len(xs)), y, t)
        ctx = [p.prompt for p in hh]
        chosen, rejected = s.score([p.chosen for p in hh], ctx), s.score([p.rejected for p in hh], ctx)
        win = np.mean((rejected > chosen) + 0.5 * (rejected == chosen))
        out["hh_pairs"][name] = {"pairwise_acc": float(win), "n": len(hh)}
        out.setdefault("thresholds", {})[name] = t
    return out


def loco(args, profanity: ProfanityScorer) -> dict:
    """(b): per DiaSafety category k, a head trained without k, scored on k's test rows."""
    test = load_diasafety(args.data_dir / "diasafety").test
    out = {}
    for k in DIASAFETY_CATEGORIES:
        s = context_scorer(args, (k,))
        c, r, y = labelled([ex for ex in test if ex.topic == k])
        out[k] = {"context": metrics(s.score(r, c), y, s.threshold),
                  "profanity": metrics(profanity.score(r, c), y, 0.5)}  # fmt: skip
    return out


def _row(name: str, m: dict, base: dict, key: str = "auroc") -> str:
    ratio = m[key] / base[key] if base[key] else float("nan")
    if key == "pairwise_acc":
        return f"| {name} | {m[key]:.3f} | {base[key]:.3f} | {ratio:.2f} | | | {m['n']} |"
    return (f"| {name} | {m['auroc']:.3f} | {base['auroc']:.3f} | {ratio:.2f} | "
            f"{m['acc@0.5']:.3f} / {m['acc@t']:.3f} vs {base['acc@0.5']:.3f} / {base['acc@t']:.3f}"
            f" | {m['ece']:.3f} vs {base['ece']:.3f} | {m['n']} |")  # fmt: skip


def table(res: dict) -> str:
    lines = ["| held-out set | context AUROC | profanity AUROC | ratio | acc@0.5 / acc@t_val "
             "(context vs profanity) | ECE (context vs profanity) | n |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in ("diasafety_test", "xstest", "builtin_test"):
        lines.append(_row(name, res[name]["context"], res[name]["profanity"]))
    for k, m in res.get("loco", {}).items():
        seen = res["seen_auroc"]["context"][k]
        lines.append(_row(f"LOCO: {k} (seen: {seen:.3f})", m["context"], m["profanity"]))
    hh = res["hh_pairs"]
    lines.append(_row("HH harmless pairs (pairwise acc)", hh["context"], hh["profanity"],
                      "pairwise_acc"))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "embeddings")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scorer_transfer.json")
    parser.add_argument("--no-loco", action="store_true", help="skip the 5 LOCO trainings")
    args = parser.parse_args()
    start = time.perf_counter()
    context, profanity = context_scorer(args), ProfanityScorer()
    res = score_sets({"context": context, "profanity": profanity}, args)
    res["head"] = context.head.info
    if not args.no_loco:
        res["loco"] = loco(args, profanity)
    res["seconds"] = round(time.perf_counter() - start, 1)
    write_json(args.out, res)
    print(f"context head: {context.head.info}")
    print(f"thresholds chosen on DiaSafety val: {res['thresholds']}")
    print(table(res))
    print(f"total {res['seconds']} s; results in {args.out}")


if __name__ == "__main__":
    main()
