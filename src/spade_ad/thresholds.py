"""Decision thresholds, chosen on training or validation data only — never on the test set.

Two ways:

* **calibration** (``calibrate_thresholds``): score normal images held out of the bank and take a
  high quantile of their image scores and of their pixel scores. Defaults: the 0.99 quantile of
  held-out image scores and the 0.999 quantile of held-out pixel scores, so about 1 % of normal
  images and 0.1 % of normal pixels would be flagged. Needs no defective examples.
* **validation** (``f1_thresholds``): on a labelled validation set, the thresholds that maximise
  image-level F1 and pixel-level F1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve

from .errors import SpadeError

DEFAULT_IMAGE_QUANTILE = 0.99
DEFAULT_PIXEL_QUANTILE = 0.999


@dataclass
class Thresholds:
    """An image-score threshold and an anomaly-map threshold: flag where the value is >= them."""

    image: float
    pixel: float | None
    source: str  # how they were chosen, e.g. "calibration: 21 held-out normal images, q=0.99/0.999"
    n_images: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (saved in the model file)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Thresholds:
        """Inverse of :meth:`as_dict`."""
        return cls(
            float(d["image"]),
            None if d.get("pixel") is None else float(d["pixel"]),
            str(d["source"]),
            int(d["n_images"]),
        )


def split_holdout(items: list[Any], fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Split training items into (bank part, held-out part) with a seeded shuffle; order kept."""
    if not 0.0 < fraction < 1.0:
        raise SpadeError(f"calibration fraction must be between 0 and 1, got {fraction}")
    n = len(items)
    n_hold = int(round(n * fraction))
    if n_hold < 1 or n_hold >= n:
        raise SpadeError(
            f"calibration fraction {fraction} of {n} training images leaves no images to hold out or none to fit on"
        )
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_hold].tolist())
    keep = [x for i, x in enumerate(items) if i not in chosen]
    hold = [x for i, x in enumerate(items) if i in chosen]
    return keep, hold


def calibrate_thresholds(
    image_scores: np.ndarray,
    anomaly_maps: np.ndarray,
    image_quantile: float = DEFAULT_IMAGE_QUANTILE,
    pixel_quantile: float = DEFAULT_PIXEL_QUANTILE,
) -> Thresholds:
    """Thresholds from the scores of held-out **normal** images (quantiles, linear interpolation)."""
    for q in (image_quantile, pixel_quantile):
        if not 0.0 < q <= 1.0:
            raise SpadeError(f"quantile must be in (0, 1], got {q}")
    n = len(image_scores)
    return Thresholds(
        image=float(np.quantile(image_scores, image_quantile)),
        pixel=float(np.quantile(anomaly_maps, pixel_quantile)),
        source=f"calibration: {n} held-out normal images, quantiles {image_quantile}/{pixel_quantile}",
        n_images=n,
    )


def _best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 when flagging scores >= threshold."""
    precision, recall, thr = precision_recall_curve(labels, scores)
    # The last precision/recall pair has no threshold (recall 0); drop it.
    p, r = precision[:-1], recall[:-1]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    i = int(np.argmax(f1))
    return float(thr[i]), float(f1[i])


def f1_thresholds(
    labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray | None, anomaly_maps: np.ndarray
) -> Thresholds:
    """F1-optimal thresholds on a labelled **validation** set (never the test set).

    Flagging uses ``>=``: the returned threshold is the lowest score that is flagged.
    """
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise SpadeError("the validation set needs both normal and anomalous images to choose thresholds")
    image_thr, _ = _best_f1_threshold(labels, np.asarray(image_scores))
    pixel_thr = None
    if masks is not None and masks.any():
        pixel_thr, _ = _best_f1_threshold(masks.ravel(), anomaly_maps.ravel())
    return Thresholds(image_thr, pixel_thr, f"validation F1-optimal: {len(labels)} labelled images", len(labels))


def f1_at(labels: np.ndarray, flagged: np.ndarray) -> float:
    """F1 of boolean decisions against boolean labels (0 when nothing is flagged or nothing is positive)."""
    labels = np.asarray(labels).astype(bool).ravel()
    flagged = np.asarray(flagged).astype(bool).ravel()
    tp = int(np.count_nonzero(labels & flagged))
    fp = int(np.count_nonzero(~labels & flagged))
    fn = int(np.count_nonzero(labels & ~flagged))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
