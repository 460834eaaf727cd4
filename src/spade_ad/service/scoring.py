"""What the model worker computes for a batch, and the pictures made from it for one answer.

Only SPADE's public API is used: ``predict`` for scores, maps and neighbour indices, ``explain`` (on
request) for neighbour distances and the correspondence picture, ``train_image`` for the pictures
of the nearest normal images.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from ..data import preprocess
from ..errors import SpadeError
from ..model import SPADE, Explanation
from ..viz import heatmap_overlay, rebuild_from_matches


@dataclass
class Job:
    """One decoded upload waiting for the model: float32 RGB (H, W, 3) in [0, 1], as ``read_image`` gives."""

    image: np.ndarray
    name: str
    explain: bool = False


@dataclass
class Scored:
    """The model's answer for one job."""

    image_score: float
    is_anomalous: bool | None
    anomaly_map: np.ndarray  # (crop, crop) float32
    neighbors: np.ndarray  # (k,) training indices, nearest first
    explanation: Explanation | None
    valid: np.ndarray | None = None  # (crop, crop) bool: the image itself, not padding (geometry="pad")
    neighbor_sq_distances: np.ndarray | None = None  # (k,) squared global distances, as predict gives

    @property
    def map_max(self) -> float:
        """Largest anomaly-map value over the image's own pixels (as ``predict`` counts them)."""
        amap = self.anomaly_map if self.valid is None else self.anomaly_map[self.valid]
        return float(amap.max())


def score_jobs(model: SPADE, jobs: list[Job]) -> list[Scored]:
    """Score a micro-batch with one ``predict`` call (and one ``explain`` call for the jobs that ask)."""
    pred = model.predict([j.image for j in jobs])
    want = [i for i, j in enumerate(jobs) if j.explain]
    explanations: dict[int, Explanation] = {}
    if want:
        explanations = dict(zip(want, model.explain([jobs[i].image for i in want]), strict=True))
    out = []
    valid = getattr(pred, "valid", None)
    for i in range(len(jobs)):
        flagged = None if pred.is_anomalous is None else bool(pred.is_anomalous[i])
        out.append(
            Scored(
                float(pred.image_scores[i]),
                flagged,
                pred.anomaly_maps[i],
                pred.neighbors[i],
                explanations.get(i),
                None if valid is None else valid[i],
                None if pred.neighbor_sq_distances is None else pred.neighbor_sq_distances[i],
            )
        )
    return out


def png_base64(array: np.ndarray, mode: str | None = None) -> str:
    """uint8 (H, W[, C]) -> base64 PNG text (fast compression: these go straight back over loopback)."""
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def chw_to_uint8(image_chw: np.ndarray) -> np.ndarray:
    """float (3, H, W) in [0, 1] -> uint8 (H, W, 3)."""
    return (np.clip(image_chw.transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def map_range(anomaly_map: np.ndarray, pixel_threshold: float | None) -> tuple[float, float]:
    """The colour scale of the pictures: 0 to twice the pixel threshold (so the threshold sits mid-scale
    and colours compare between parts) when the model has one, else the map's own minimum to maximum
    (``anomaly_map``: the values that count, e.g. without padding)."""
    if pixel_threshold is not None and pixel_threshold > 0:
        return 0.0, 2.0 * float(pixel_threshold)
    return float(anomaly_map.min()), float(anomaly_map.max())


def outline_rgba(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """A transparent picture with the boundary of ``mask`` drawn in white, ``width`` pixels inside it."""
    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    edge = mask & ~inner
    out = np.zeros((*mask.shape, 4), np.uint8)
    out[edge] = (255, 255, 255, 255)
    return out


@dataclass
class Pictures:
    """Base64 PNGs (all crop x crop, aligned with each other) and the numbers behind their colours."""

    anomaly_map_png: str
    overlay_png: str
    outline_png: str | None
    map_range: tuple[float, float]
    anomalous_pixel_fraction: float | None


def render_pictures(model: SPADE, job: Job, scored: Scored) -> Pictures:
    """The anomaly map (grey, 0..255 over ``map_range``), the heatmap over the cropped image, and the
    outline of the pixels at or above the model's pixel threshold (if it has one)."""
    th = model.thresholds_
    pixel_th = None if th is None else th.pixel
    amap, valid = scored.anomaly_map, scored.valid
    lo, hi = map_range(amap if valid is None else amap[valid], pixel_th)
    # The pixels the map is aligned with: the model's own preprocessing of the decoded upload.
    crop = preprocess(job.image, model.image_size, model.crop_size, getattr(model, "geometry", "squash"))
    grey = (np.clip((amap - lo) / max(hi - lo, 1e-12), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    outline = fraction = None
    if pixel_th is not None:
        mask = amap >= pixel_th
        if valid is not None:
            mask &= valid  # padding is not part of the part
        outline = png_base64(outline_rgba(mask), "RGBA")
        fraction = float(mask.sum() / (mask.size if valid is None else max(int(valid.sum()), 1)))
    return Pictures(png_base64(grey, "L"), png_base64(heatmap_overlay(crop, amap, lo, hi)), outline, (lo, hi), fraction)


def render_correspondence(model: SPADE, explanation: Explanation) -> str | None:
    """The image rebuilt from the normal patches its pixels matched (None when the training files
    are not readable on this machine: the model stores their names, not their pixels)."""
    try:
        rebuilt = rebuild_from_matches(explanation, model.train_image)
    except SpadeError:
        return None
    return png_base64(chw_to_uint8(rebuilt))


def train_image_png(model: SPADE, index: int) -> bytes:
    """Training image ``index`` as the model sees it (cropped), PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(chw_to_uint8(model.train_image(index))).save(buf, "PNG", compress_level=1)
    return buf.getvalue()
