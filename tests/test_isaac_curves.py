"""ISAAC sharpening scale (shares vs counts), DiaSafety-S/M/H levels, and the tau/eps curves
(docs/methods.md B.2 step 8, "DiaSafety-S/M/H", "Choosing eps and tau"; issue 11 item 7)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safealign.data.diasafety_levels import (
    load_diasafety_level,
    subsample_unsafe,
    unsafe_share_indices,
)
from safealign.errors import ConfigError
from safealign.isaac.curves import diversity
from safealign.isaac.sampler import Neighbourhoods, draw_targets
from safealign.isaac.sharpen import cluster_probs, probs_batch

# ---------------------------------------------------------------- scale: shares vs counts (Eq. 2)


def test_exp_mode_shares_vs_counts_by_hand():
    # sizes [6, 3, 1], tau 1: shares d = [0.6, 0.3, 0.1];
    # softmax(d) = [e^.6, e^.3, e^.1] / 4.2771485 = [0.4260125, 0.3155978, 0.2583897]
    got = cluster_probs([6, 3, 1], 1.0, "exp", scale="shares")
    np.testing.assert_allclose(got, [0.4260125, 0.3155978, 0.2583897], rtol=1e-6)
    # counts: softmax([6, 3, 1]) = [403.42879, 20.085537, 2.7182818] / 426.23261
    #       = [0.9464991, 0.0471234, 0.0063775] (7 digits)
    got = cluster_probs([6, 3, 1], 1.0, "exp", scale="counts")
    np.testing.assert_allclose(got, [0.9464991, 0.0471234, 0.0063775], rtol=1e-5)


def test_paper_mode_shares_vs_counts_by_hand():
    # SI = (6 - 3) / (6 - 1) = 0.6 on either scale; tau 0.5 -> temperature SI * tau = 0.3.
    # shares / 0.3 = [2, 1, 1/3]: [e^2, e^1, e^(1/3)] / 11.5029504 = [0.6423618, 0.2363117, 0.1213265]
    got = cluster_probs([6, 3, 1], 0.5, "paper", scale="shares")
    np.testing.assert_allclose(got, [0.6423618, 0.2363117, 0.1213265], rtol=1e-6)
    # counts / 0.3 = [20, 10, 3.33]: already winner-take-all at this tau
    got = cluster_probs([6, 3, 1], 0.5, "paper", scale="counts")
    np.testing.assert_allclose(got, [0.9999545, 4.53979e-5, 5.77749e-8], rtol=1e-5)


def test_shares_do_not_depend_on_neighbourhood_size_but_counts_do():
    # ten times the neighbours, same proportions: the same distribution only on the shares scale
    small, big = cluster_probs([6, 3, 1], 0.5, "code"), cluster_probs([60, 30, 10], 0.5, "code")
    np.testing.assert_allclose(small, big, rtol=1e-12)
    c_small = cluster_probs([6, 3, 1], 0.5, "code", scale="counts")
    assert not np.allclose(c_small, cluster_probs([60, 30, 10], 0.5, "code", scale="counts"))
    # wta and random are scale-free
    for mode in ("wta", "random"):
        np.testing.assert_array_equal(
            cluster_probs([6, 3, 1], 0.5, mode), cluster_probs([6, 3, 1], 0.5, mode, scale="counts")
        )


def test_shares_are_renormalised_over_the_kept_clusters():
    # sizes [5, 3, 2], top-k keeps 2: d = [5/8, 3/8] (not [5/10, 3/10]);
    # softmax: [1, e^-0.25] / (1 + e^-0.25) = [0.5621765, 0.4378235]
    p = probs_batch(np.array([[5, 3, 2]]), np.array([2]), 1.0, "exp", scale="shares")[0]
    np.testing.assert_allclose(p, [0.5621765, 0.4378235, 0.0], rtol=1e-6)


def test_draw_targets_passes_the_scale_and_rejects_unknown_ones():
    labels = np.array([[0, 0, 0, 0, 0, 0, 1, 1, 1, 2]] * 50, dtype=np.int32)
    nb = Neighbourhoods(np.tile(np.arange(10), (50, 1)), np.ones((50, 10), np.float32), labels,
                        10, 0.5, "exact")  # fmt: skip
    kw = dict(m=200, tau=0.5, mode="paper", keep_original=False)
    shares = draw_targets(nb, scale="shares", rng=np.random.default_rng(0), **kw)
    counts = draw_targets(nb, scale="counts", rng=np.random.default_rng(0), **kw)
    head = lambda r: (r.targets < 6).mean()  # noqa: E731 - members 0-5 form the largest cluster
    assert head(shares) == pytest.approx(0.6423618, abs=0.01)  # the hand example above
    assert head(counts) > 0.999
    assert shares.params["scale"] == "shares" and counts.params["scale"] == "counts"
    with pytest.raises(ConfigError, match="'scale'"):
        draw_targets(nb, scale="logits", rng=np.random.default_rng(0))


def test_diversity_counts_distinct_clusters_of_the_targets():
    labels = np.array([[0, 0, 1, 2], [0, 1, 1, 1]])
    neigh = np.array([[5, 6, 7, 8], [1, 2, 3, 4]])
    targets = np.array([[5, 6, 8], [2, 3, 9]])  # row 0: clusters 0, 0, 2; row 1: 1, 1, unseen
    np.testing.assert_array_equal(diversity(labels, neigh, targets), [2, 2])


# ---------------------------------------------------------------- DiaSafety-S/M/H


def _write_diasafety(path, n_safe=40, n_unsafe=30):
    """A DiaSafety split in the released format: a JSON array of {context,response,category,label}."""
    rows = [
        {
            "context": f"context {i}",
            "response": f"{'rude' if i >= n_safe else 'kind'} reply {i}",
            "category": "Offending User",
            "label": "Unsafe" if i >= n_safe else "Safe",
        }
        for i in range(n_safe + n_unsafe)
    ]
    rows.insert(3, {"context": "c", "response": "  ", "category": "", "label": "Unsafe"})  # dropped
    path.write_text(json.dumps(rows))
    return path


def test_level_counts_are_exact_and_seeded(tmp_path):
    path = _write_diasafety(tmp_path / "train.json")
    corpus = load_diasafety_level(path, unsafe_share=0.2, seed=0)
    # 40 safe rows kept; unsafe = round(0.2 * 40 / 0.8) = 10 of 30; the blank row dropped first
    labels = [r.label for r in corpus.train]
    assert (labels.count("safe"), labels.count("unsafe"), len(labels)) == (40, 10, 50)
    assert corpus.dropped["unsafe_subsampled"] == 20 and corpus.dropped["empty_response"] == 1
    again = load_diasafety_level(path, unsafe_share=0.2, seed=0)
    other = load_diasafety_level(path, unsafe_share=0.2, seed=1)
    assert corpus.train == again.train and corpus.train != other.train
    order = [int(r.response.split()[-1]) for r in corpus.train]
    assert order == sorted(order)  # a subsequence of the released rows
    released = load_diasafety_level(path, unsafe_share=None)
    assert len(released.train) == 70 and "unsafe_subsampled" not in released.dropped
    assert len(load_diasafety_level(path, unsafe_share=0.0).train) == 40


@pytest.mark.parametrize(("share", "unsafe"), [(0.04, 2), (0.1, 4), (0.3, 17)])
def test_paper_levels_on_the_fixture(tmp_path, share, unsafe):
    # round(share * 40 / (1 - share)): 1.67 -> 2, 4.44 -> 4, 17.14 -> 17
    keep, stats = unsafe_share_indices(["safe"] * 40 + ["unsafe"] * 30, share, seed=3)
    assert stats["unsafe_kept"] == unsafe and stats["rows"] == len(keep) == 40 + unsafe
    assert stats["unsafe_share"] == pytest.approx(unsafe / (40 + unsafe))
    kept, stats2 = subsample_unsafe([_Row(x) for x in ["safe"] * 40 + ["unsafe"] * 30], share, 3)
    assert stats2 == stats and len(kept) == len(keep)


class _Row:
    def __init__(self, label: str) -> None:
        self.label = label


@pytest.mark.parametrize("share", [1.0, -0.1, 1.5, "0.1", True, float("nan")])
def test_bad_share_names_the_key_before_reading(tmp_path, share):
    with pytest.raises(ConfigError, match=r"'data.source.unsafe_share'.*\[0, 1\)"):
        load_diasafety_level(tmp_path / "missing.json", unsafe_share=share)


def test_impossible_share_names_the_key(tmp_path):
    path = _write_diasafety(tmp_path / "train.json")
    # 0.5 needs 40 unsafe rows beside 40 safe ones, the file has 30 (share 0.4286 as released)
    with pytest.raises(ConfigError, match=r"'data.source.unsafe_share'.*needs 40.*has 30"):
        load_diasafety_level(path, unsafe_share=0.5)


def test_experiment_uses_the_level_loader(make_cfg, tmp_path):
    from hydra.utils import instantiate

    path = _write_diasafety(tmp_path / "train.json")
    cfg = make_cfg("experiment=isaac_diasafety", f"data.source.path={path}", tiny=False)
    assert cfg.data.source.unsafe_share == 0.1  # DiaSafety-M
    assert cfg.data.encoder._target_.endswith("MiniLMEncoder")
    corpus = instantiate(cfg.data.source)()
    assert [r.label for r in corpus.train].count("unsafe") == 4  # round(0.1 * 40 / 0.9)


# ---------------------------------------------------------------- curves, end to end


def test_curves_on_a_tiny_builtin_corpus(tmp_path, monkeypatch):
    from safealign.isaac import curves

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "curves"
    argv = ["--out", str(out), "--taus", "0.01,0.1,1", "--eps", "0.4,0.9,1.3",
            "--scales", "shares,counts", "data=isaac_builtin", "data.source.size=300",
            "data.k=30", "data.encoder.dim=32", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    curves.main(argv)
    data = json.loads((out / "curves.json").read_text())
    rows = data["rows"]
    tau = [r for r in rows if r["curve"] == "tau" and r["scale"] == "shares"]
    eps = [r for r in rows if r["curve"] == "eps"]
    assert [r["tau"] for r in tau] == [0.01, 0.1, 1.0] and len(eps) == 3
    # tau: sharper -> fewer distinct clusters among the M targets (non-flat on the shares scale)
    assert tau[0]["diversity"] < tau[-1]["diversity"]
    assert len({r["clusters"] for r in tau}) == 1  # the same neighbourhoods at every tau
    # eps: a larger radius merges clusters
    assert eps[0]["clusters"] > eps[1]["clusters"] > eps[2]["clusters"]
    assert all(0 <= r["target_unsafe"] <= 1 and 1 <= r["diversity"] <= 3 for r in rows)
    assert "| tau | eps | clusters/ctx |" in (out / "curves.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000
    assert not list(out.glob(".*tmp"))


def test_curves_reject_a_bad_share_before_any_work(tmp_path):
    from safealign.isaac import curves

    with pytest.raises(ConfigError, match=r"'--unsafe-shares'.*\[0, 1\)"):
        curves.main(["--out", str(tmp_path), "--unsafe-shares", "0.1,1.2", "experiment=no_such"])
    assert not list(tmp_path.iterdir())
