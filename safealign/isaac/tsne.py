"""t-SNE picture of one context's neighbour responses, coloured by DBSCAN cluster (paper Fig. 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from safealign.io import atomic_path

_MARKERS = {"safe": "o", "unsafe": "X", "evasive": "^"}


def pick_context(labels: np.ndarray, unsafe_of_neighbour: np.ndarray) -> int:
    """A readable context to draw: its neighbours mix safe and unsafe responses, and its cluster
    count is the median of such contexts (falls back to context 0 if none mixes)."""
    n_unsafe = unsafe_of_neighbour.sum(axis=1)
    mixed = np.flatnonzero((n_unsafe > 0) & (n_unsafe < labels.shape[1]))
    if not len(mixed):
        return 0
    n_clusters = labels[mixed].max(axis=1) + 1
    return int(mixed[np.argsort(n_clusters, kind="stable")[len(mixed) // 2]])


def plot_neighbourhood(
    emb: np.ndarray,
    cluster_labels: np.ndarray,
    safety: list[str],
    path: str | Path,
    *,
    seed: int = 0,
    title: str = "",
    max_colours: int = 10,
) -> Path:
    """Save a t-SNE scatter of K response embeddings: colour = cluster, marker = safety label.

    Args:
        emb: The neighbours' response embeddings, Shape: (K, d).
        cluster_labels: Their DBSCAN labels, Shape: (K,).
        safety: Their gold labels ("safe" / "unsafe" / "evasive" / other).
        path: Output PNG (written atomically).
        seed: t-SNE random state.
        title: Figure title.
        max_colours: The largest clusters get colours; the rest are grey.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    _scatter(ax, _tsne_2d(emb, seed), cluster_labels, safety, max_colours)
    handles = [
        plt.Line2D([], [], marker=m, linestyle="", color="black", label=lab)
        for lab, m in _MARKERS.items()
        if lab in safety
    ]
    ax.legend(handles=handles, title="gold label", loc="best")
    ax.set_title(title or "context neighbours' responses (colour = DBSCAN cluster)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def _tsne_2d(emb: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(2.0, (len(emb) - 1) / 3))  # sklearn needs perplexity < K
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(np.asarray(emb, dtype=np.float64))


def _scatter(
    ax, xy: np.ndarray, cluster_labels: np.ndarray, safety: list[str], max_colours: int
) -> None:
    """One scatter per (safety label, cluster): the ``max_colours`` largest clusters in tab10
    colours (by size rank), the rest grey; marker by safety label."""
    import matplotlib.pyplot as plt

    sizes = np.bincount(cluster_labels)
    rank = np.empty_like(sizes)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(len(sizes))
    cmap = plt.get_cmap("tab10")
    for lab in sorted(set(safety)):
        for c in np.unique(cluster_labels):
            sel = (cluster_labels == c) & (np.array(safety) == lab)
            if not sel.any():
                continue
            colour = cmap(rank[c] % 10) if rank[c] < max_colours else (0.7, 0.7, 0.7, 1.0)
            ax.scatter(
                xy[sel, 0],
                xy[sel, 1],
                color=colour,
                marker=_MARKERS.get(lab, "s"),
                s=40 if lab == "safe" else 70,
                edgecolors="black",
                linewidths=0.3,
            )
