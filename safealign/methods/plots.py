"""PNG plots (matplotlib, Agg backend): KL curves, as the ADPO paper compares DPO vs ADPO (A.4)."""

from __future__ import annotations

from pathlib import Path

from safealign.io import atomic_path

KL_KEYS = ("train/kl/chosen_step", "train/kl/rejected_step", "train/kl/toxic_step")


def plot_kl(histories: dict[str, list[dict]], path: str | Path, keys=KL_KEYS) -> Path | None:
    """One panel per kl/* key, one line per run. Returns the path, or None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(k in row for h in histories.values() for row in h)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.4), squeeze=False)
    for ax, key in zip(axes[0], present, strict=True):
        for name, hist in histories.items():
            pts = [(r["step"], r[key]) for r in hist if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=name)
        ax.set_title(key.replace("train/", "").replace("_step", ""))
        ax.set_xlabel("step")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
