"""Evaluation metrics for anomaly detection: image AUROC, pixel AUROC and PRO / AU-PRO.

The PRO curve and its integral follow the official MVTec AD evaluation code (Bergmann et al.,
``pro_curve_util.compute_pro`` and ``generic_util.trapezoid``) so that our numbers can be put
next to published ones. Deliberate differences, none of which changes a result beyond float
rounding:

* the curve is kept in float64 (MVTec casts the FPRs to float32);
* bad input raises :class:`ValueError` instead of failing an ``assert`` (asserts vanish under
  ``python -O``) or silently dividing by zero;
* non-finite points dropped by :func:`trapezoid` are reported with :func:`warnings.warn`
  instead of ``print``;
* region weights are computed per image with one ``bincount`` instead of one full-image mask
  per region, and scores are not copied into a new array before sorting.

Conventions: ``masks`` are ``(N, H, W)`` arrays where a non-zero value marks a defect pixel
(bool or 0/1; this is also what ``scipy.ndimage.label`` in the MVTec code treats as
foreground), ``maps`` are ``(N, H, W)`` real-valued anomaly scores (higher = more anomalous),
image ``labels`` are 0 (normal) / 1 (anomalous).
"""

from __future__ import annotations

import warnings
from bisect import bisect

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "pro_auc",
    "pro_curve",
    "roc_curve_points",
    "trapezoid",
]

# 8-connectivity, as in the MVTec code: diagonal neighbours belong to the same defect region.
_STRUCTURE_8 = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------- input checks


def _image_inputs(labels: ArrayLike, scores: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level inputs; return (bool labels, scores) as 1-D arrays."""
    labels = np.asarray(labels)
    scores = _as_scores(scores)
    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError(f"{name}: labels and scores must be 1-D, got shapes {labels.shape} and {scores.shape}")
    if labels.shape != scores.shape:
        raise ValueError(
            f"{name}: labels and scores must have the same length, got shapes {labels.shape} and {scores.shape}"
        )
    # Only 0/1 are accepted: sklearn would silently take the larger of any two values as the
    # positive class, so e.g. labels {1, 2} would "work" and mean something else.
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            bad = np.unique(labels[~np.isin(labels, (0, 1))])[:5]
            raise ValueError(f"{name}: labels must be 0 (normal) or 1 (anomalous), got {bad}")
        labels = labels == 1
    _require_both_classes(labels, name, "labels", "images")
    return labels, scores


def _pixel_inputs(masks: ArrayLike, maps: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate pixel-level inputs; return (bool masks, scores), both (N, H, W)."""
    masks = np.asarray(masks)
    maps = _as_scores(maps)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(
            f"{name}: masks and maps must both have shape (N, H, W), got masks {masks.shape} and maps {maps.shape}"
        )
    if masks.dtype != bool:
        # Non-zero = defect, like scipy.ndimage.label in the MVTec code (so 0/255 PNG masks
        # work too). This is the one copy we make, at 1 byte per pixel.
        masks = masks != 0
    return masks, maps


def _as_scores(scores: ArrayLike) -> np.ndarray:
    """Return scores as an array without copying when they are already numeric.

    float32 maps are *not* promoted to float64: only the order of the scores and which of them
    are tied matter to every metric here, and promotion does not change either, while it would
    cost a full copy of ~30M pixels.
    """
    scores = np.asarray(scores)
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        scores = scores.astype(np.float64)
    return scores


def _require_both_classes(positive: np.ndarray, name: str, what: str, unit: str) -> None:
    # A ROC/PRO curve needs both classes; sklearn would only warn (roc_curve) or raise an
    # obscure message (roc_auc_score), so say plainly what is missing.
    n_pos = int(np.count_nonzero(positive))
    if n_pos == 0 or n_pos == positive.size:
        present = "anomalous (1)" if n_pos else "normal (0)"
        raise ValueError(
            f"{name}: {what} contain only one class ({present}, {positive.size} {unit}); "
            "an AUROC needs both normal and anomalous samples"
        )


# --------------------------------------------------------------------------- ROC metrics


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level ROC-AUC (sklearn ``roc_auc_score``); labels 0 = normal, 1 = anomalous.

    Tied scores count one half, as in sklearn (constant scores give 0.5).
    Raises ValueError if only one class is present or the shapes do not fit.
    """
    labels, scores = _image_inputs(labels, scores, "image_auroc")
    return float(roc_auc_score(labels, scores))


def _valid_input(valid: ArrayLike | None, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    if valid is None:
        return None
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != shape:
        raise ValueError(f"{name}: valid must have the maps' shape {shape}, got {valid.shape}")
    return valid


def pixel_auroc(masks: ArrayLike, maps: ArrayLike, valid: ArrayLike | None = None) -> float:
    """Pixel-level ROC-AUC over all pixels of all images.

    ``masks`` (N, H, W) bool/0-1 ground truth, ``maps`` (N, H, W) anomaly scores; ``valid``
    (N, H, W) bool, optional: count only these pixels (e.g. not the padding of ``geometry="pad"``).
    Raises ValueError on a shape mismatch or if the masks hold only one class.
    """
    masks, maps = _pixel_inputs(masks, maps, "pixel_auroc")
    valid = _valid_input(valid, maps.shape, "pixel_auroc")
    # ravel() is a view for contiguous arrays: a full MVTec category is ~30M pixels, so we
    # avoid building per-image lists and concatenating them.
    y_true, y_score = (masks.ravel(), maps.ravel()) if valid is None else (masks[valid], maps[valid])
    _require_both_classes(y_true, "pixel_auroc", "masks", "pixels")
    return float(roc_auc_score(y_true, y_score))


def roc_curve_points(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Image-level ROC curve as (fpr, tpr) arrays (sklearn ``roc_curve``), e.g. for plots."""
    labels, scores = _image_inputs(labels, scores, "roc_curve_points")
    fpr, tpr, _ = roc_curve(labels, scores)
    return np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)


# --------------------------------------------------------------------------- PRO


def pro_curve(masks: ArrayLike, maps: ArrayLike, valid: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap (PRO) curve as (fprs, pros), like MVTec's ``compute_pro``.

    Every threshold between distinct scores gives one point: FPR = fraction of all defect-free
    pixels (of all images, including images without any defect) scoring at or above it;
    PRO = mean over all 8-connected ground-truth regions of the fraction of the region scoring
    at or above it. Points are in increasing order and start at (0, 0) and end at (1, 1).
    ``valid`` (N, H, W) bool, optional: count only these pixels, e.g. not the padding of
    ``geometry="pad"`` (regions are the 8-connected components of ``mask & valid``).
    Raises ValueError if there is no defect region, no defect-free pixel, a non-finite score or
    a shape mismatch.
    """
    masks, maps = _pixel_inputs(masks, maps, "pro_curve")
    valid = _valid_input(valid, maps.shape, "pro_curve")
    if valid is not None:
        masks = masks & valid  # a defect pixel outside the valid area is not part of the image
    if not np.isfinite(maps if valid is None else maps[valid]).all():
        # NaN would sort to one end and never tie with anything, silently bending the curve.
        raise ValueError("pro_curve: maps contain NaN or infinite values")

    # Weight of each pixel in the PRO numerator: 1/size of its region, 0 for OK pixels. Each
    # region then adds at most 1 in total, so large regions do not dominate small ones.
    region_weight = np.zeros(masks.shape, dtype=np.float64)
    num_regions = 0
    for i in range(masks.shape[0]):
        labeled, n_regions = ndimage.label(masks[i], structure=_STRUCTURE_8)
        if n_regions:
            sizes = np.bincount(labeled.ravel(), minlength=n_regions + 1)
            inv_size = np.zeros(n_regions + 1, dtype=np.float64)
            inv_size[1:] = 1.0 / sizes[1:]
            region_weight[i] = inv_size[labeled]  # label 0 (OK pixels) -> weight 0
        num_regions += n_regions
    # OK pixels are exactly those with label 0, i.e. not in the mask; images without a defect
    # contribute only here, to the FPR denominator.
    if valid is not None:
        # Pixels outside the valid area leave the curve: flatten to the valid ones only.
        maps, masks, region_weight = maps[valid], masks[valid], region_weight[valid]
    num_ok = masks.size - int(np.count_nonzero(masks))
    if num_regions == 0:
        raise ValueError("pro_curve: the masks contain no defect region; PRO is undefined")
    if num_ok == 0:
        raise ValueError("pro_curve: the masks contain no defect-free pixel; FPR is undefined")

    # Lower the threshold one pixel at a time: sort scores in decreasing order. Which order
    # tied scores end up in does not matter, only the last point of each tie run is kept.
    scores_flat = maps.reshape(-1)
    order = np.argsort(scores_flat)[::-1]

    sorted_scores = scores_flat[order]
    # keep[j] is True where the next score differs (and at the end): that point contains the
    # changes of all pixels sharing the threshold, so tied pixels move together.
    keep = np.empty(sorted_scores.size, dtype=bool)
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=keep[:-1])
    keep[-1] = True
    del sorted_scores

    ok_sorted = masks.reshape(-1)[order]
    np.logical_not(ok_sorted, out=ok_sorted)
    # float64 cumsum of 0/1 is exact up to 2**53 pixels; MVTec counts in uint32 and then
    # casts the FPRs to float32, we keep float64 throughout.
    fprs = np.cumsum(ok_sorted, dtype=np.float64)[keep]
    del ok_sorted
    fprs /= num_ok

    weight_sorted = region_weight.reshape(-1)[order]
    del region_weight, order
    pros = np.cumsum(weight_sorted)[keep]
    del weight_sorted, keep
    pros /= num_regions

    # Summation rounding can push the last values a hair above 1.
    np.clip(fprs, None, 1.0, out=fprs)
    np.clip(pros, None, 1.0, out=pros)
    zero, one = np.zeros(1), np.ones(1)
    return np.concatenate((zero, fprs, one)), np.concatenate((zero, pros, one))


def trapezoid(x: ArrayLike, y: ArrayLike, x_max: float | None = None) -> float:
    """Area under the curve (x, y) by the trapezoid rule, optionally only up to ``x_max``.

    MVTec's ``generic_util.trapezoid``: ``x`` sorted ascending (repeats allowed: vertical
    steps add nothing); non-finite points are dropped with a warning; if ``x_max`` lies between
    two points, y at ``x_max`` is interpolated linearly and the partial trapezoid added.
    Raises ValueError if ``x_max`` lies outside the range of x (MVTec asserts).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"trapezoid: x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.all():
        warnings.warn(
            f"trapezoid: dropping {int(np.count_nonzero(~finite))} point(s) with a non-finite x or y value",
            RuntimeWarning,
            stacklevel=2,
        )
        x = x[finite]
        y = y[finite]

    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            # Index that would keep x sorted after inserting x_max.
            ins = bisect(x, x_max)
            if not 0 < ins < len(x):
                raise ValueError(
                    f"trapezoid: x_max={x_max} lies outside the range of x "
                    f"[{x.min() if x.size else 'empty'}, {x.max() if x.size else 'empty'}]"
                )
            # The y value at x_max is unknown: interpolate between its neighbours, then add
            # the area of the partial trapezoid from x[ins - 1] to x_max.
            y_interp = y[ins - 1] + ((y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1]))
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        keep = x <= x_max
        x = x[keep]
        y = y[keep]

    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def pro_auc(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3, valid: ArrayLike | None = None) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec's AU-PRO, in [0, 1]).

    Dividing by ``fpr_limit`` makes a perfect detector score 1 whatever the limit.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"pro_auc: fpr_limit must be in (0, 1], got {fpr_limit}")
    fprs, pros = pro_curve(masks, maps, valid)
    return trapezoid(fprs, pros, x_max=fpr_limit) / fpr_limit
