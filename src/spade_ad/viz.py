"""Pictures for people: heatmap overlays of anomaly maps on the (cropped) input image."""

from __future__ import annotations

import numpy as np


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
