"""Benchmark the built-in synthetic corpus: generation speed and exact label rates.

Run: .venv/bin/python bench/builtin.py [--sizes 10000 40000 160000] [--repeats 2]
Prints one row per size (best of ``repeats`` wall times) and the label rates of each corpus.
"""

from __future__ import annotations

import argparse
import gc
import time

from safealign.data.builtin import generate_builtin, label_counts
from safealign.data.triples import preference_triples
from safealign.types import EVASIVE, SAFE, UNSAFE


def _best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        out = None
        gc.collect()  # drop the previous corpus before timing the next one
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 160_000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--poison", type=float, default=0.04)
    parser.add_argument("--evasive", type=float, default=0.08)
    args = parser.parse_args()
    generate_builtin(size=100)  # warm-up: imports and template compilation are not generation

    head = f"{'size':>8} {'seconds':>8} {'dialogues/s':>12} {'contexts':>9} {'triples_s':>9}"
    head += f" {'safe':>7} {'unsafe':>7} {'evasive':>7} {'train/val/test':>20}"
    print(f"poison_fraction={args.poison} evasive_fraction={args.evasive} seed=0")
    print(head)
    print("-" * len(head))
    for size in args.sizes:
        kwargs = {"size": size, "poison_fraction": args.poison, "evasive_fraction": args.evasive}
        seconds, corpus = _best_time(lambda kw=kwargs: generate_builtin(**kw), args.repeats)
        dialogues = corpus.train + corpus.val + corpus.test
        start = time.perf_counter()
        preference_triples(corpus.train, seed=0)
        triple_seconds = time.perf_counter() - start
        counts = label_counts(dialogues)
        rates = [counts[lab] / len(dialogues) for lab in (SAFE, UNSAFE, EVASIVE)]
        splits = f"{len(corpus.train)}/{len(corpus.val)}/{len(corpus.test)}"
        n_contexts = len({e.context for e in dialogues})
        row = f"{size:>8} {seconds:>8.3f} {size / seconds:>12,.0f} {n_contexts:>9} "
        row += f"{triple_seconds:>9.3f} " + " ".join(f"{r:>7.4f}" for r in rates)
        print(row + f" {splits:>20}")


if __name__ == "__main__":
    main()
