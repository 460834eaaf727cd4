"""Pictures for people: heatmap overlays of anomaly maps on the (cropped) input image."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .model import Explanation


def heatmap_overlay(
    image_chw: np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> np.ndarray:
    """Blend a colour-mapped anomaly map over an image -> uint8 (H, W, 3).

    ``image_chw`` is the preprocessed image (3, H, W) in [0, 1] that the map is aligned with;
    ``vmin``/``vmax`` fix the colour scale (use the same for every image of a run so colours compare).
    """
    from matplotlib import colormaps

    if image_chw.shape[1:] != anomaly_map.shape:
        raise ValueError(f"image {image_chw.shape[1:]} and map {anomaly_map.shape} differ in size")
    span = max(float(vmax) - float(vmin), 1e-12)
    norm = np.clip((anomaly_map - vmin) / span, 0.0, 1.0)
    heat = colormaps[cmap](norm)[:, :, :3]
    img = np.transpose(image_chw, (1, 2, 0))
    out = (1.0 - alpha) * img + alpha * heat
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def rebuild_from_matches(
    explanation: Explanation,
    train_images: Callable[[int], np.ndarray],
) -> np.ndarray:
    """The test image rebuilt from the normal patches its pixels matched -> float32 (3, H, W).

    For every position (y, x) of the explanation's level (stride s), the s x s patch at the matched
    position of the matched training image is copied in. Where the test image shows something no
    normal image has (a missing or alien part), the rebuild shows what normal parts look like there
    instead, so the difference stands out side by side. ``train_images(i)`` returns training image i
    preprocessed exactly as for the model, (3, H, W) in [0, 1].
    """
    e = explanation
    s = e.stride
    h, w = e.source_image.shape
    out = np.zeros((3, h * s, w * s), dtype=np.float32)
    cache: dict[int, np.ndarray] = {}
    for idx in np.unique(e.source_image):
        cache[int(idx)] = train_images(int(idx))
    for y in range(h):
        for x in range(w):
            src = cache[int(e.source_image[y, x])]
            sy, sx = int(e.source_y[y, x]) * s, int(e.source_x[y, x]) * s
            out[:, y * s : (y + 1) * s, x * s : (x + 1) * s] = src[:, sy : sy + s, sx : sx + s]
    return out
