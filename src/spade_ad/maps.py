"""Anomaly-map post-processing: upsample each level, combine with equal weight, smooth."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def upsample(level_map: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling of an (h, w) distance map to (size, size), align_corners=False as the
    reference implementation (``F.interpolate(..., mode='bilinear', align_corners=False)``)."""
    return F.interpolate(level_map[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]


def combine_levels(level_maps: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Mean of the upsampled per-level maps.

    The paper does not say whether levels are summed or averaged; the reference implementation that
    reproduced its numbers averages, and a mean keeps the scale independent of the number of levels.
    """
    acc = upsample(level_maps[0], size)
    for m in level_maps[1:]:
        acc = acc + upsample(m, size)
    return acc / len(level_maps)


def smooth(score_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (scipy, truncate=4, reflect borders, as the reference); sigma 0 = none."""
    if sigma <= 0:
        return score_map.astype(np.float32, copy=False)
    return gaussian_filter(score_map.astype(np.float32, copy=False), sigma=sigma)
