"""ISAAC pseudo-response sampling (docs/methods.md Part B): encoders, context neighbours, DBSCAN content
clusters, adaptive sharpening and the vectorised sampler. See :mod:`safealign.isaac.sampler`."""

from safealign.isaac.sampler import (
    Neighbourhoods,
    SamplerResult,
    as_multi_target,
    draw_targets,
    original_mask,
    prepare_neighbourhoods,
    sample_pseudo_responses,
)
from safealign.isaac.sharpen import MODES, clip_clusters, cluster_probs, sensitive_indicator

__all__ = [
    "MODES",
    "Neighbourhoods",
    "SamplerResult",
    "as_multi_target",
    "clip_clusters",
    "cluster_probs",
    "draw_targets",
    "original_mask",
    "prepare_neighbourhoods",
    "sample_pseudo_responses",
    "sensitive_indicator",
]
