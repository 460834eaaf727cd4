"""Fit on a category's normal training images, score its test set, compute the paper's metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset, read_mask
from .errors import SpadeError
from .metrics import image_auroc, pixel_auroc, pro_auc
from .model import SPADE, Prediction
from .thresholds import Thresholds, f1_at, f1_thresholds


@dataclass
class CategoryResult:
    """Metrics of one category, plus what is needed to draw curves or a report later."""

    category: str
    image_auroc: float
    pixel_auroc: float | None
    pro: float | None
    n_train: int
    n_test: int
    seconds: float
    fit_seconds: float
    predict_seconds: float
    prediction: Prediction
    labels: np.ndarray
    masks: np.ndarray | None
    model_config: dict[str, Any]
    model: SPADE
    thresholds: Thresholds | None = None
    image_f1: float | None = None  # at the thresholds (chosen without the test set)
    pixel_f1: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON record: metrics, counts and timings."""
        return {
            "image_auroc": self.image_auroc,
            "pixel_auroc": self.pixel_auroc,
            "pro": self.pro,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "seconds": round(self.seconds, 3),
            "fit_seconds": round(self.fit_seconds, 3),
            "predict_seconds": round(self.predict_seconds, 3),
            "seconds_per_test_image": round(self.predict_seconds / max(self.n_test, 1), 4),
            "thresholds": None if self.thresholds is None else self.thresholds.as_dict(),
            "image_f1": self.image_f1,
            "pixel_f1": self.pixel_f1,
        }


def load_masks(ds: Dataset, image_size: int, crop_size: int, geometry: str = "squash") -> np.ndarray | None:
    """Ground truth (N, crop, crop) bool in test order; normal images get all-False masks.

    Returns None when no anomalous image has a mask (pixel metrics are then not defined).
    Datasets with their own mask storage (video frames: one array per video) provide ``load_masks``.
    """
    if hasattr(ds, "load_masks"):
        return ds.load_masks(image_size, crop_size)
    if not any(t.mask is not None for t in ds.test):
        return None
    masks = np.zeros((len(ds.test), crop_size, crop_size), dtype=bool)
    for i, t in enumerate(ds.test):
        if t.mask is not None:
            masks[i] = read_mask(t.mask, image_size, crop_size, geometry=geometry)
    return masks


def set_thresholds_from_validation(model: SPADE, validation: Dataset) -> None:
    """Give a fitted model the F1-optimal thresholds on a labelled validation set (its ``test`` part)."""
    pred = model.predict([t.path for t in validation.test])
    masks = load_masks(validation, model.image_size, model.crop_size, model.geometry)
    labels = np.array([t.label for t in validation.test])
    maps = pred.anomaly_maps
    if pred.valid is not None and masks is not None:
        masks, maps = masks[pred.valid], maps[pred.valid]  # padding is not part of any image
    model.set_thresholds(f1_thresholds(labels, pred.image_scores, masks, maps))


def evaluate_dataset(
    ds: Dataset,
    make_model: Callable[[], SPADE],
    log: Callable[[str], None] = lambda s: None,
    calibrate: float | None = None,
    validation: Dataset | None = None,
) -> CategoryResult:
    """Fit a fresh model on ``ds.train``, predict ``ds.test``, compute image/pixel AUROC and PRO.

    Thresholds (optional) never look at the test set: ``calibrate`` holds out that fraction of the
    training images and takes quantiles of their scores; ``validation`` (a labelled dataset whose
    ``test`` part is the validation set) picks F1-optimal thresholds. The test set is then only
    scored, and image/pixel F1 at those thresholds are reported.
    """
    if calibrate is not None and validation is not None:
        raise SpadeError("choose either calibration or a validation set for thresholds, not both")
    model = make_model()
    t0 = time.perf_counter()
    model.fit(ds.train, calibrate=calibrate)
    if validation is not None:
        set_thresholds_from_validation(model, validation)
    t1 = time.perf_counter()
    pred = model.predict([t.path for t in ds.test])
    t2 = time.perf_counter()
    labels = np.array([t.label for t in ds.test], dtype=np.int64)
    masks = load_masks(ds, model.image_size, model.crop_size, model.geometry)
    img_auc = image_auroc(labels, pred.image_scores)
    pix_auc = pro = None
    if masks is not None and masks.any():
        pix_auc = pixel_auroc(masks, pred.anomaly_maps, valid=pred.valid)
        pro = pro_auc(masks, pred.anomaly_maps, valid=pred.valid)
    th = model.thresholds_
    image_f1 = pixel_f1 = None
    if th is not None:
        image_f1 = f1_at(labels, pred.image_scores >= th.image)
        if th.pixel is not None and masks is not None:
            valid = np.ones(masks.shape, bool) if pred.valid is None else pred.valid
            pixel_f1 = f1_at(masks[valid], pred.anomaly_maps[valid] >= th.pixel)
    t3 = time.perf_counter()
    log(f"{ds.name}: fit {t1 - t0:.1f} s, predict {t2 - t1:.1f} s, metrics {t3 - t2:.1f} s")
    return CategoryResult(
        category=ds.name,
        image_auroc=float(img_auc),
        pixel_auroc=None if pix_auc is None else float(pix_auc),
        pro=None if pro is None else float(pro),
        n_train=len(model.train_paths_),
        n_test=len(ds.test),
        seconds=t3 - t0,
        fit_seconds=t1 - t0,
        predict_seconds=t2 - t1,
        prediction=pred,
        labels=labels,
        masks=masks,
        model_config=model.get_config(),
        model=model,
        thresholds=th,
        image_f1=image_f1,
        pixel_f1=pixel_f1,
    )


def summarise(results: list[CategoryResult], config: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: one record per category, their mean, and the configuration used."""
    out: dict[str, Any] = {r.category: r.as_dict() for r in results}

    def mean(key: str) -> float | None:
        vals = [getattr(r, key) for r in results if getattr(r, key) is not None]
        return float(np.mean(vals)) if vals else None

    out["mean"] = {
        "image_auroc": mean("image_auroc"),
        "pixel_auroc": mean("pixel_auroc"),
        "pro": mean("pro"),
        "n_train": int(sum(r.n_train for r in results)),
        "n_test": int(sum(r.n_test for r in results)),
        "seconds": round(float(sum(r.seconds for r in results)), 3),
    }
    out["config"] = config
    return out


def find_categories(root: str | Path) -> list[str]:
    """Sub-folders of ``root`` in MVTec layout (those with ``train/good``), sorted."""
    r = Path(root)
    if not r.is_dir():
        return []
    return sorted(p.name for p in r.iterdir() if (p / "train" / "good").is_dir())
