"""ISAAC assumption report: do sampled pseudo responses have a lower unsafe rate than the corpus?

    python -m safealign.isaac.report --out DIR [--corpus builtin,diasafety] [--encoder tfidf|minilm|hf]

For each labelled corpus it embeds contexts and responses, builds the neighbourhoods once and
draws targets with every sharpening mode. Theorem 1 (paper Sec. 3.2) predicts that ``random``
sampling keeps the unsafe rate of the neighbourhoods (checked with no clipping and no
keep-original shortcut, the theorem's setting); Theorem 2 predicts that convex sharpening
(``paper``, ``code``, ``exp``, ``wta``) lowers it while safe responses form the larger clusters.
The built-in corpus is generated at poison fractions 0.04 / 0.1 / 0.3: its unsafe responses form
one family per topic, which becomes a topic's largest cluster above ~0.18, where Theorem 2's
assumption fails. Writes report.csv, report.md, report.json and a t-SNE PNG (paper Fig. 2) to --out.
How tau and eps move these numbers: :mod:`safealign.isaac.curves` (docs/methods.md B.2).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import time
from pathlib import Path

import numpy as np

from safealign.io import atomic_open, write_json
from safealign.isaac.encoder import HFEncoder, MiniLMEncoder, TfidfSvdEncoder, embed_cached
from safealign.isaac.sampler import draw_targets, original_mask, prepare_neighbourhoods
from safealign.isaac.sharpen import MODES, SCALES, TAU
from safealign.tables import markdown_table
from safealign.utils import terminal_handler

log = logging.getLogger("safealign.isaac.report")  # not __name__: "__main__" under python -m
DEFAULT_DIASAFETY = Path(__file__).resolve().parents[3] / "shared" / "data" / "diasafety"
DEFAULT_EPS = {"tfidf": 0.7, "minilm": 0.8, "hf": 0.22}  # = conf/data/isaac_encoder
COLUMNS = [
    "corpus", "poison", "setting", "mode", "raw_unsafe", "neigh_unsafe", "sampled_unsafe",
    "change", "raw_evasive", "sampled_evasive", "head_unsafe", "keep_original_rate",
    "mean_clusters", "mean_si",
]  # fmt: skip


def load_corpora(args: argparse.Namespace) -> list[tuple[str, float | None, list]]:
    """(name, poison fraction or None, train DialogueExamples) for each requested corpus."""
    out = []
    for name in args.corpus.split(","):
        if name == "builtin":
            from safealign.data.builtin import generate_builtin

            for p in (float(x) for x in args.poison.split(",")):
                corpus = generate_builtin(args.size, p, args.evasive, args.seed)
                out.append(("builtin", p, corpus.train))
        elif name == "diasafety":
            path = Path(args.diasafety_path)
            if not path.exists():
                log.warning("DiaSafety not found at %s: skipped", path)
                continue
            from safealign.data.sources import load_diasafety

            out.append(("diasafety", None, load_diasafety(path, split="train").train))
        else:
            raise ValueError(f"--corpus: unknown corpus {name!r} (builtin, diasafety)")
    return out


def make_encoder(args: argparse.Namespace):
    if args.encoder == "tfidf":
        return TfidfSvdEncoder(dim=256, seed=args.seed)
    if args.encoder == "minilm":
        return MiniLMEncoder()
    if not args.hf_path:
        raise ValueError("--encoder hf needs --hf-path (a local model directory)")
    return HFEncoder(args.hf_path, pooling=args.pooling, seed=args.seed)


def _rates(targets: np.ndarray, unsafe: np.ndarray, evasive: np.ndarray) -> tuple[float, float]:
    return float(unsafe[targets].mean()), float(evasive[targets].mean())


def _head_unsafe(nb, unsafe: np.ndarray) -> float:
    """Share of contexts whose largest response cluster is mostly unsafe (Thm 2's assumption fails)."""
    n, k = nb.labels.shape
    counts = np.bincount((nb.labels + np.arange(n)[:, None] * k).ravel(), minlength=n * k)
    head = np.argmax(counts.reshape(n, k), axis=1)  # first largest = first encountered
    in_head = nb.labels == head[:, None]
    bad = (in_head & unsafe[nb.neigh_idx]).sum(axis=1)
    return float((2 * bad > in_head.sum(axis=1)).mean())


def _draws(nb, is_orig: np.ndarray, args, base: dict, unsafe: np.ndarray,
           evasive: np.ndarray) -> list[dict]:  # fmt: skip
    """One report row per (setting, mode): ISAAC as configured, without the keep-original
    shortcut, and Theorem 1's setting (random sampling over the whole neighbourhood)."""
    settings = [
        ("isaac", args.top_k, True, MODES),
        ("no_shortcut", args.top_k, False, MODES),
        ("theorem1", nb.k, False, ("random",)),
    ]
    out = []
    for setting, top_k, keep, modes in settings:
        for mode in modes:
            res = draw_targets(
                nb,
                is_orig,
                top_k=top_k,
                top_p=args.top_p,
                tau=args.tau,
                scale=args.scale,
                mode=mode,
                m=args.m,
                keep_original=keep,
                rng=np.random.default_rng(args.seed),
            )
            su, se = _rates(res.targets, unsafe, evasive)
            s = res.summary()
            out.append(
                dict(
                    base,
                    setting=setting,
                    mode=mode,
                    sampled_unsafe=su,
                    sampled_evasive=se,
                    change=su - base["raw_unsafe"],
                    keep_original_rate=s["keep_original_rate"],
                    mean_clusters=s["mean_clusters"],
                    mean_si=s["mean_si"],
                )
            )
    return out


def evaluate(name: str, poison: float | None, rows: list, args, cache: Path) -> tuple[list, dict]:
    """All settings x modes for one corpus; returns report rows and the prepared neighbourhoods."""
    contexts, responses = [r.context for r in rows], [r.response for r in rows]
    labels = np.array([r.label for r in rows])
    unsafe, evasive = labels == "unsafe", labels == "evasive"
    enc = make_encoder(args)
    ctx_emb = embed_cached(contexts, enc, cache)
    resp_emb = embed_cached(responses, enc, cache)
    eps = args.eps if args.eps is not None else DEFAULT_EPS[args.encoder]
    nb = prepare_neighbourhoods(ctx_emb, resp_emb, k=args.k, eps=eps, cache_dir=cache)
    is_orig = original_mask(nb, responses)
    base = dict(
        corpus=name,
        poison="" if poison is None else poison,
        raw_unsafe=float(unsafe.mean()),
        raw_evasive=float(evasive.mean()),
        neigh_unsafe=float(unsafe[nb.neigh_idx].mean()),
        head_unsafe=_head_unsafe(nb, unsafe),
    )
    out = _draws(nb, is_orig, args, base, unsafe, evasive)
    extra = dict(nb=nb, resp_emb=resp_emb, labels=labels, unsafe=unsafe, eps=eps)
    return out, extra


# (report column, header, format) of the markdown table; report.csv has every COLUMNS key.
MARKDOWN = (
    ("corpus", "corpus", "{}"),
    ("poison", "poison", "{}"),
    ("setting", "setting", "{}"),
    ("mode", "mode", "{}"),
    ("raw_unsafe", "raw unsafe", "{:.4f}"),
    ("neigh_unsafe", "neighbourhood unsafe", "{:.4f}"),
    ("sampled_unsafe", "sampled unsafe", "{:.4f}"),
    ("change", "change", "{:+.4f}"),
    ("raw_evasive", "raw evasive", "{:.4f}"),
    ("sampled_evasive", "sampled evasive", "{:.4f}"),
    ("head_unsafe", "head cluster unsafe", "{:.3f}"),
    ("keep_original_rate", "keep-original", "{:.3f}"),
    ("mean_clusters", "clusters/ctx", "{:.1f}"),
)


def to_markdown(rows: list[dict]) -> str:
    body = ([fmt.format(r[key]) for key, _, fmt in MARKDOWN] for r in rows)
    return markdown_table([head for _, head, _ in MARKDOWN], body) + "\n"


def verdicts(rows: list[dict]) -> list[str]:
    """One line per corpus: Theorem 1 (random ~ neighbourhood rate) and Theorem 2 (convex lowers)."""
    out = []
    for key in dict.fromkeys((r["corpus"], r["poison"]) for r in rows):
        group = [r for r in rows if (r["corpus"], r["poison"]) == key]
        t1 = next(r for r in group if r["setting"] == "theorem1")
        convex = {
            r["mode"]: r["sampled_unsafe"]
            for r in group
            if r["setting"] == "no_shortcut" and r["mode"] != "random"
        }
        lowered = [m for m, v in convex.items() if v < t1["raw_unsafe"]]
        out.append(
            f"{key[0]} poison={key[1] or '-'}: Theorem 1 random {t1['sampled_unsafe']:.4f} vs "
            f"neighbourhood {t1['neigh_unsafe']:.4f}; Theorem 2 convex modes lowering the raw "
            f"rate {t1['raw_unsafe']:.4f}: {', '.join(lowered) or 'none'}; head clusters "
            f"mostly unsafe in {100 * t1['head_unsafe']:.1f}% of contexts"
        )
    return out


def write_outputs(out: Path, rows: list[dict], params: dict, notes: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_open(out / "report.csv") as f:
        f.write(buf.getvalue())
    md = (
        "# ISAAC assumption report\n\n"
        + to_markdown(rows)
        + "\n"
        + "\n".join(f"- {n}" for n in notes)
        + "\n"
    )
    with atomic_open(out / "report.md") as f:
        f.write(md)
    write_json(out / "report.json", {"params": params, "rows": rows, "verdicts": notes})


def tsne_figure(out: Path, extra: dict, seed: int, title: str) -> Path:
    """Paper Fig. 2: one context's K neighbour responses, coloured by DBSCAN cluster."""
    from safealign.isaac.tsne import pick_context, plot_neighbourhood

    nb = extra["nb"]
    i = pick_context(nb.labels, extra["unsafe"][nb.neigh_idx])
    rows = nb.neigh_idx[i]
    return plot_neighbourhood(
        extra["resp_emb"][rows],
        nb.labels[i],
        list(extra["labels"][rows]),
        out / "tsne_neighbourhood.png",
        seed=seed,
        title=f"{title}, context {i}: K={nb.k}, eps={extra['eps']}",
    )


def run(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    cache = Path(args.cache_dir) if args.cache_dir else out / "cache"
    t0 = time.perf_counter()
    rows, first_extra, first_name = [], None, ""
    for name, poison, examples in load_corpora(args):
        r, extra = evaluate(name, poison, examples, args, cache)
        rows += r
        if first_extra is None or (name == "builtin" and poison == 0.1):
            first_extra, first_name = extra, f"{name} poison={poison}" if poison else name
        log.info("%s poison=%s: %d dialogues (%.0f s)", name, poison, len(examples),
                 time.perf_counter() - t0)  # fmt: skip
    if not rows:
        raise SystemExit("no corpus evaluated")
    notes = verdicts(rows)
    params = {k: v for k, v in vars(args).items()}
    params["eps_used"] = args.eps if args.eps is not None else DEFAULT_EPS[args.encoder]
    write_outputs(out, rows, params, notes)
    if not args.no_tsne:
        tsne_figure(out, first_extra, args.seed, first_name)
    log.info("%s\n%s", to_markdown(rows), "\n".join(notes))
    log.info("wrote %s/report.{csv,md,json} in %.0f s", out, time.perf_counter() - t0)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ISAAC assumption report (Theorems 1-2).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--corpus", default="builtin,diasafety", help="comma list: builtin,diasafety")
    p.add_argument("--encoder", choices=("tfidf", "minilm", "hf"), default="tfidf")
    p.add_argument("--hf-path", default=None, help="local transformers encoder (--encoder hf)")
    p.add_argument("--pooling", choices=("pooler", "mean"), default="pooler")
    p.add_argument("--size", type=int, default=5000, help="built-in corpus size")
    p.add_argument("--poison", default="0.04,0.1,0.3", help="built-in poison fractions")
    p.add_argument("--evasive", type=float, default=0.08)
    p.add_argument("--diasafety-path", default=str(DEFAULT_DIASAFETY))
    p.add_argument("--k", type=int, default=150)
    p.add_argument("--eps", type=float, default=None, help="DBSCAN eps (default per encoder)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--tau", type=float, default=TAU, help="on the --scale scale (B.2 step 8)")
    p.add_argument("--scale", choices=SCALES, default="shares", help="Eq. 2 softmax input")
    p.add_argument("--m", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="embedding/neighbourhood cache (OUT/cache)")
    p.add_argument("--no-tsne", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, handlers=[terminal_handler()])
    run(parse_args(argv))


if __name__ == "__main__":
    main()
