"""ISAAC tau and eps curves: what the sharpening temperature and the DBSCAN radius do to the
pseudo targets (docs/methods.md B.2 "Choosing eps and tau"; issue 11 item 7).

    python -m safealign.isaac.curves --out DIR --taus 0.01,0.03,0.1,0.3,1 --eps 0.3,0.4,0.5,0.6 \
        [--unsafe-shares 0.04,0.1,0.3] [--scales shares,counts] [Hydra overrides ...]

The Hydra overrides compose conf/train.yaml as ``python train.py`` would (e.g.
``experiment=isaac_diasafety``, ``data/isaac_encoder@data=minilm``); the corpus, encoder, K, the
sampler settings and the default eps / tau are read from the composed ``data`` node, so a curve
describes what training would draw. Per point: clusters per context (DBSCAN, before clipping),
the unsafe rate of the M pseudo targets beside the corpus rate, and their diversity (distinct
clusters among a context's M targets). The tau curve uses the config's eps (one curve per
``--scales`` entry), the eps curve the config's tau and scale. Embeddings and neighbourhoods use
the training caches (``data.cache_dir``). ``--unsafe-shares`` cuts the training split to each
share (DiaSafety-S/M/H, :mod:`safealign.data.diasafety_levels`), embedding all rows only once.
Writes curves.json, curves.md and curves.png to --out, each atomically.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from safealign.data.diasafety_levels import check_share, unsafe_share_indices
from safealign.io import atomic_open, atomic_path, write_json
from safealign.isaac.encoder import embed_cached
from safealign.isaac.prepare import prepare_neighbourhoods
from safealign.isaac.sampler import draw_targets, original_mask
from safealign.tables import markdown_table
from safealign.types import UNSAFE

log = logging.getLogger("safealign.isaac.curves")  # not __name__: "__main__" under python -m
CONF = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class Corpus:
    """One curve's corpus: its (sub)set of rows with their embeddings and gold labels."""

    name: str
    responses: list[str]
    ctx_emb: np.ndarray
    resp_emb: np.ndarray
    unsafe: np.ndarray  # (N,) bool, gold labels: only the diagnostics use them


def diversity(labels: np.ndarray, neigh_idx: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Distinct DBSCAN clusters among each context's M targets, Shape: (N,).

    A target is a response index; its cluster is the label of its position in the context's
    neighbour list (a target found nowhere there counts as a cluster of its own)."""
    hit = neigh_idx[:, None, :] == targets[:, :, None]  # (N, M, K)
    pos = hit.argmax(axis=2)
    cluster = np.take_along_axis(labels, pos, axis=1).astype(np.int64)
    cluster = np.where(hit.any(axis=2), cluster, -1 - np.arange(targets.shape[1])[None, :])
    s = np.sort(cluster, axis=1)
    return 1 + (s[:, 1:] != s[:, :-1]).sum(axis=1)


def curve_point(nb, is_original: np.ndarray, unsafe: np.ndarray, sampler: dict, seed: int) -> dict:
    """One point of a curve: draw the targets with ``sampler`` and summarise them."""
    res = draw_targets(nb, is_original, rng=np.random.default_rng(seed), **sampler)
    return {
        "clusters": float(res.n_clusters.mean()),
        "kept_clusters": float(res.n_kept.mean()),
        "target_unsafe": float(unsafe[res.targets].mean()),
        "diversity": float(diversity(nb.labels, nb.neigh_idx, res.targets).mean()),
        "keep_original": float(res.kept_original.mean()),
    }


def curves_for(c: Corpus, data: DictConfig, args: argparse.Namespace, seed: int) -> list[dict]:
    """The tau curve(s) at the config's eps and the eps curve at the config's tau, for one corpus."""
    sampler = OmegaConf.to_container(data.sampler, resolve=True)
    k, cache = int(data.k), data.get("cache_dir")
    base = dict(corpus=c.name, rows=len(c.responses), corpus_unsafe=float(c.unsafe.mean()))

    def nbh(eps: float):
        nb = prepare_neighbourhoods(c.ctx_emb, c.resp_emb, k=k, eps=eps,
                                    neighbours=data.get("neighbours", "exact"), cache_dir=cache)  # fmt: skip
        return nb, original_mask(nb, c.responses)

    rows = []
    nb, is_orig = nbh(float(data.eps))
    for scale in args.scales:
        for tau in args.taus:
            point = curve_point(
                nb, is_orig, c.unsafe, {**sampler, "tau": tau, "scale": scale}, seed
            )
            rows.append(dict(base, curve="tau", scale=scale, tau=tau, eps=float(data.eps), **point))
    for eps in args.eps:
        nb, is_orig = nbh(eps)
        point = curve_point(nb, is_orig, c.unsafe, sampler, seed)
        rows.append(dict(base, curve="eps", scale=sampler.get("scale", "shares"),
                         tau=float(sampler["tau"]), eps=eps, **point))  # fmt: skip
        log.info("%s eps=%g: %.1f clusters/context, target unsafe %.4f (corpus %.4f)",
                 c.name, eps, point["clusters"], point["target_unsafe"], base["corpus_unsafe"])  # fmt: skip
    return rows


def compose_data(overrides: list[str]) -> DictConfig:
    """The ``data`` node (and ``seed``) of conf/train.yaml composed with ``overrides``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):  # outside a Hydra run ${hydra:runtime.*} has no value
        cfg.paths.root_dir = str(Path.cwd())
        cfg.paths.output_dir = str(Path.cwd())
    return cfg


def load_corpora(cfg: DictConfig, shares: list[float] | None) -> list[Corpus]:
    """The config's training rows, embedded once; with ``shares``, one cut corpus per share."""
    from hydra.utils import instantiate

    data = cfg.data
    if shares:  # embed the rows as released once, then cut them per share
        with open_dict(data):
            data.source.unsafe_share = None
    source = instantiate(data.source)
    corpus = source() if callable(source) else source
    rows, name = corpus.train, corpus.name or "corpus"
    encoder, cache = instantiate(data.encoder), data.get("cache_dir")
    ctx = embed_cached([r.context for r in rows], encoder, cache)
    resp = embed_cached([r.response for r in rows], encoder, cache)
    unsafe = np.array([r.label == UNSAFE for r in rows])
    if not shares:
        return [Corpus(name, [r.response for r in rows], ctx, resp, unsafe)]
    out, seed = [], int(data.source.get("seed", cfg.seed))
    for share in shares:
        keep, stats = unsafe_share_indices([r.label for r in rows], share, seed, "--unsafe-shares")
        log.info("%s unsafe_share=%s: %s", name, share, stats)
        out.append(Corpus(f"{name} unsafe_share={share}", [rows[i].response for i in keep],
                          ctx[keep], resp[keep], unsafe[keep]))  # fmt: skip
    return out


# (key, header, format) of the markdown tables
COLUMNS = (
    ("tau", "tau", "{:g}"),
    ("eps", "eps", "{:g}"),
    ("clusters", "clusters/ctx", "{:.1f}"),
    ("kept_clusters", "kept", "{:.1f}"),
    ("target_unsafe", "target unsafe", "{:.4f}"),
    ("corpus_unsafe", "corpus unsafe", "{:.4f}"),
    ("diversity", "distinct clusters / M", "{:.2f}"),
    ("keep_original", "keep-original", "{:.3f}"),
)


def to_markdown(rows: list[dict], m: int) -> str:
    """One table per (corpus, curve, scale)."""
    parts = []
    for key in dict.fromkeys((r["corpus"], r["curve"], r["scale"]) for r in rows):
        group = [r for r in rows if (r["corpus"], r["curve"], r["scale"]) == key]
        head = f"## {key[0]} ({group[0]['rows']} rows): {key[1]} curve, scale={key[2]}, M={m}"
        body = ([fmt.format(r[k]) for k, _, fmt in COLUMNS] for r in group)
        parts.append(head + "\n\n" + markdown_table([h for _, h, _ in COLUMNS], body))
    return "# ISAAC tau and eps curves\n\n" + "\n\n".join(parts) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Two rows of panels (tau curve, eps curve) x (target unsafe, diversity, clusters/ctx);
    colour = corpus, solid = shares scale, dotted = counts, dashed = the corpus unsafe rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(q["corpus"] for q in rows))}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for r, curve in enumerate(("tau", "eps")):
        for c, y in enumerate(("target_unsafe", "diversity", "clusters")):
            ax = axes[r, c]
            for key in dict.fromkeys(
                (q["corpus"], q["scale"]) for q in rows if q["curve"] == curve
            ):
                pts = [q for q in rows if q["curve"] == curve and (q["corpus"], q["scale"]) == key]
                ax.plot([q[curve] for q in pts], [q[y] for q in pts], marker="o",
                        color=colour[key[0]], ls="-" if key[1] == "shares" else ":",
                        label=f"{key[0]} ({key[1]})")  # fmt: skip
                if y == "target_unsafe":  # the corpus rate the targets should fall below
                    ax.axhline(pts[0]["corpus_unsafe"], ls="--", lw=0.8, color=colour[key[0]])
            ax.set_xscale("log" if curve == "tau" else "linear")
            ax.set_xlabel(curve)
            ax.set_ylabel(y)
        axes[r, 0].legend(fontsize=7)
    fig.suptitle("ISAAC pseudo targets: dashed = corpus unsafe rate", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> list[dict]:
    for share in args.unsafe_shares or ():
        check_share(share, "--unsafe-shares")  # before composing, loading or embedding
    cfg = compose_data(args.overrides)
    if "sampler" not in cfg.data or "encoder" not in cfg.data:
        raise SystemExit("the data config has no ISAAC sampler: use an isaac experiment or data")
    rows = []
    for corpus in load_corpora(cfg, args.unsafe_shares):
        rows += curves_for(corpus, cfg.data, args, int(cfg.seed))
    out, m = Path(args.out), int(cfg.data.sampler.m)
    params = {**vars(args), "data": OmegaConf.to_container(cfg.data, resolve=True)}
    write_json(out / "curves.json", {"params": params, "rows": rows})
    md = to_markdown(rows, m)
    with atomic_open(out / "curves.md") as f:
        f.write(md)
    plot(rows, out / "curves.png")
    log.info("%s\nwrote %s/curves.{json,md,png}", md, out)
    return rows


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--taus", type=_floats, default=_floats("0.01,0.03,0.1,0.3,1"))
    p.add_argument("--eps", type=_floats, default=_floats("0.3,0.4,0.5,0.6,0.7"))
    p.add_argument("--scales", type=lambda s: s.split(","), default=["shares"],
                   help="tau curve scales: shares,counts")  # fmt: skip
    p.add_argument("--unsafe-shares", type=_floats, default=None,
                   help="cut the training split to these unsafe shares (DiaSafety-S/M/H)")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=isaac_diasafety")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from safealign.utils import TERMINAL, terminal_handler

    shown = (*TERMINAL, log.name, "safealign.data.diasafety_levels")
    logging.basicConfig(level=logging.INFO, handlers=[terminal_handler(shown)])
    run(parse_args(argv))


if __name__ == "__main__":
    main()
