"""The context scorer's trained head: pair features, logistic regression, Platt calibration and a
validation-chosen threshold (docs/scorers.md). Pure numpy/sklearn over embedding arrays.

Kept as plain arrays (:meth:`Head.to_arrays`), so the cache stores it as an ``.npz`` read with
``allow_pickle=False``: nothing trained here is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from safealign.errors import DataError

FEATURES = "r,c,r*c,|r-c|"  # the pair features, named in the cache key


def pair_features(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[r, c, r*c, |r-c|] of response and context embeddings, Shape: (N, 4d).

    The products and distances are what lets a linear head see the *relation* between reply and
    context (agreeing with a toxic remark, advice on a risky plan), not only the reply's words.
    """
    return np.hstack([r, c, r * c, np.abs(r - c)]).astype(np.float64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


@dataclass(frozen=True)
class Head:
    """Standardise -> linear logit -> Platt: p = sigmoid(a * logit + b) (Platt 1999)."""

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    coef: np.ndarray  # (D,)
    intercept: float
    platt: tuple[float, float]  # (a, b)
    threshold: float  # chosen on validation data (:func:`choose_threshold`)
    info: dict = field(default_factory=dict)  # sources, counts, val metrics: for the log only

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def proba(self, x: np.ndarray) -> np.ndarray:
        """Calibrated P(unsafe), Shape: (N,)."""
        a, b = self.platt
        return _sigmoid(a * self.logits(x) + b)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean, "scale": self.scale, "coef": self.coef,
            "scalars": np.array([self.intercept, *self.platt, self.threshold]),
            "info": np.array(json.dumps(self.info, sort_keys=True)),
        }  # fmt: skip

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Head:
        intercept, a, b, threshold = (float(v) for v in arrays["scalars"])
        info = json.loads(str(arrays["info"]))
        return cls(arrays["mean"], arrays["scale"], arrays["coef"], intercept, (a, b), threshold,
                   info)  # fmt: skip


def head_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """Why cached head arrays cannot be used (shapes, non-finite values), or None."""
    try:
        d = arrays["coef"].shape
        if arrays["mean"].shape != d or arrays["scale"].shape != d or len(d) != 1:
            return f"inconsistent shapes {[arrays[k].shape for k in ('mean', 'scale', 'coef')]}"
        if arrays["scalars"].shape != (4,):
            return f"scalars have shape {arrays['scalars'].shape}, expected (4,)"
        nums = np.concatenate([arrays[k] for k in ("mean", "scale", "coef", "scalars")])
        if not np.isfinite(nums).all() or (arrays["scale"] <= 0).any():
            return "non-finite values or a non-positive scale"
        json.loads(str(arrays["info"]))
    except (KeyError, ValueError, TypeError) as e:
        return f"not a context-scorer head ({type(e).__name__}: {e})"
    return None


def choose_threshold(p: np.ndarray, y: np.ndarray) -> float:
    """The threshold t (flag when p >= t) of highest accuracy on ``(p, y)``; among equally
    accurate ones the closest to 0.5, so a calibrated head keeps 0.5 unless the data say
    otherwise. Candidates are midpoints between sorted distinct scores (and 0.5)."""
    u = np.unique(p)
    cand = np.concatenate([(u[1:] + u[:-1]) / 2, [0.5, u[0], u[-1] + 1e-9]])
    acc = np.array([np.mean((p >= t) == (y == 1)) for t in cand])
    best = np.flatnonzero(acc >= acc.max() - 1e-12)
    return float(cand[best[np.argmin(np.abs(cand[best] - 0.5))]])


def fit_platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) of p = sigmoid(a z + b) by (almost unregularised) maximum likelihood on ``(z, y)``."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e6, max_iter=1000).fit(z.reshape(-1, 1), y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def fit_head(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
    c_grid: tuple[float, ...], seed: int, info: dict | None = None,
) -> Head:  # fmt: skip
    """Fit a class-balanced logistic regression per C in ``c_grid``, keep the one of highest
    validation AUROC (ties: the smaller C), then Platt-calibrate and choose the threshold on the
    same validation split.

    Raises:
        DataError: a split holds only one class.
    """
    from sklearn.linear_model import LogisticRegression

    for name, y in (("train", y_train), ("val", y_val)):
        if len(np.unique(y)) < 2:
            raise DataError(f"context scorer {name} data", "needs both safe and unsafe examples")
    mean = x_train.mean(axis=0)
    scale = np.maximum(x_train.std(axis=0), 1e-6)
    xt, xv = (x_train - mean) / scale, (x_val - mean) / scale
    best = None
    for c in sorted(c_grid):
        # Balanced classes: the sources differ in unsafe share; Platt restores the val prior.
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
        lr.fit(xt, y_train)
        auc = _auroc(y_val, lr.decision_function(xv))
        if best is None or auc > best[0] + 1e-12:
            best = (auc, c, lr)
    auc, c, lr = best
    z_val = lr.decision_function(xv)
    a, b = fit_platt(z_val, y_val)
    threshold = choose_threshold(_sigmoid(a * z_val + b), y_val)
    info = {**(info or {}), "C": c, "val_auroc": round(auc, 4), "threshold": round(threshold, 4)}
    return Head(mean, scale, lr.coef_[0].astype(np.float64), float(lr.intercept_[0]), (a, b),
                threshold, info)  # fmt: skip
