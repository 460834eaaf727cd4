"""The SPADE estimator: fit on normal images, then score and segment new ones.

Conventions follow scikit-learn: ``__init__`` only stores parameters, ``fit`` validates and returns
``self``, fitted state ends in ``_``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .backbones import Backbone, backbone_info, build_backbone
from .bank import FeatureBank, Level, MappedLevel, content_sha256, load_model_file, save_model_file
from .data import DEFAULT_MAX_PIXELS, GEOMETRIES, as_image_list, item_size, load_preprocessed, valid_region
from .errors import ModelFileError, NotFittedError, SpadeError, WeightsError
from .features import Features, Preprocessing, extract_features
from .maps import combine_levels, smooth
from .runtimes import (
    DEVICES,
    RUNTIMES,
    DeviceBackbone,
    RuntimeBackbone,
    device_levels,
    export_backbone,
    resolve_device,
    runtime_backbone,
)
from .search import PRECISIONS, device_search, knn_images, nearest_distances, nearest_neighbors, window_search
from .thresholds import (
    DEFAULT_IMAGE_QUANTILE,
    DEFAULT_PIXEL_QUANTILE,
    Thresholds,
    calibrate_thresholds,
    split_holdout,
)

IMAGE_SCORES = ("knn", "map_max", "knn*map_max")
GALLERIES = ("knn", "all")
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: Entries of the change history a model keeps (older ones are dropped; the audit log keeps everything).
HISTORY_LENGTH = 50
#: Image names listed per history entry (an add of hundreds of images records the first ones and the count).
HISTORY_NAMES = 10


def _patch_size_from_config(value: Any) -> int | tuple[int, ...]:
    """A saved ``patch_size``: an int, or a JSON list of per-level sizes (back to a tuple, as given)."""
    return tuple(value) if isinstance(value, list) else value


class SpadeWarning(UserWarning):
    """Something worth knowing that does not stop the work (e.g. fewer training images than k)."""


@dataclass
class Prediction:
    """Output of :meth:`SPADE.predict`.

    ``image_scores`` (N,) mean squared distance to the k nearest normal images (float64);
    ``anomaly_maps`` (N, crop, crop) float32; ``neighbors`` (N, k) indices into the training set
    (``SPADE.train_paths_``), nearest first; ``names`` the input names (paths or ``array[i]``).
    """

    image_scores: np.ndarray
    anomaly_maps: np.ndarray
    neighbors: np.ndarray
    names: list[str]
    is_anomalous: np.ndarray | None = None  # image_scores >= the model's image threshold, if it has one
    #: (N,) bool: whether the pixel stage ran. With ``segment_above``, images at or below it are not
    #: segmented and their ``anomaly_maps`` rows are NaN.
    segmented: np.ndarray | None = None
    #: (N, crop, crop) bool where the map covers the image itself, not padding (``geometry="pad"``);
    #: None when every pixel does (``geometry="squash"``). Pixel metrics and ``map_max`` use only these.
    valid: np.ndarray | None = None
    #: (N, k) float64 squared Euclidean distances of the global features to ``neighbors``.
    neighbor_sq_distances: np.ndarray | None = None


@dataclass
class Explanation:
    """Correspondences behind one image's score (see :meth:`SPADE.explain`).

    ``knn_score`` the kNN image score (mean squared global distance to the ``image_k`` nearest);
    ``neighbors`` (k,) training indices, nearest first, with their squared global distances;
    at pyramid ``level`` (stride ``stride``), for every test position (y, x): the training image
    ``source_image[y, x]`` and position (``source_y``, ``source_x``) of its nearest normal feature,
    and the ``distance`` to it.
    """

    name: str
    knn_score: float
    neighbors: np.ndarray
    neighbor_sq_distances: np.ndarray
    level: int
    source_image: np.ndarray
    source_y: np.ndarray
    source_x: np.ndarray
    distance: np.ndarray
    stride: int


class SPADE:
    """Sub-Image Anomaly Detection with Deep Pyramid Correspondences (Cohen & Hoshen, 2020).

    Parameters
    ----------
    backbone
        registry name (``efficientnet_lite0`` embedded; ``wide_resnet50_2``, ``resnet18``).
    k
        nearest normal images, for the image score and as the pixel gallery (paper: 50).
    kappa
        nearest gallery features per pixel, averaged (paper: 1).
    levels
        pyramid levels by stride: 1 = stride 4, 2 = stride 8, 3 = stride 16.
    sigma
        Gaussian smoothing of the anomaly map (0 disables).
    image_size
        resize to this square first (paper: 256).
    crop_size
        then centre crop to this square (paper: 224).
    weights
        None (default source), a path to a weights file, or ``"random"`` (tests only).
    batch_size
        images per backbone batch.
    progress
        show progress bars.
    max_pixels
        refuse images larger than this (decompression bombs).
    image_score
        ``"knn"`` (paper: mean squared distance to the ``image_k`` nearest normal images),
        ``"map_max"`` (maximum of the smoothed anomaly map), or ``"knn*map_max"`` (sqrt of the kNN
        score times the map maximum: a product, so its ranking does not depend on either term's scale).
    image_k
        nearest normal images for the kNN image score (None = ``k``, the paper's choice); the
        pixel gallery always uses ``k``.
    patch_size
        average pixel features over patch_size x patch_size neighbourhoods before matching
        (odd; 1 = the paper's plain features). A sequence gives one size per level, in the order
        of ``levels`` (opt-in: e.g. ``(3, 5)`` keeps the stride-8 level sharp and gives the
        stride-16 level more context).
    precision
        ``"fp32"`` (exact search, the default) or ``"bf16"`` (opt-in: bfloat16 products pick
        each pixel's nearest gallery tile, the distance is then recomputed exactly; faster on wide features).
    window
        None (the paper: every gallery position) or R, match each pixel only against gallery
        features within +-R positions of its own (opt-in; for aligned objects; kappa must be 1).
    bank_dtype
        ``"float32"`` or ``"float16"`` (opt-in: pixel features stored at half size; distances
        are still computed in float32).
    geometry
        ``"squash"`` (the paper: resize to a square whatever the aspect ratio) or ``"pad"``
        (keep the aspect ratio, pad to a square; maps are valid only where the image is, see
        :attr:`Prediction.valid`).
    runtime
        where the backbone runs: ``"torch"``, ``"onnxruntime"`` or ``"openvino"`` (same features to
        float32 rounding; a deployment choice, see :mod:`spade_ad.runtimes`). Saved as the model's default.
    export_dir
        a folder written by ``spade-ad export`` for the ONNX Runtime / OpenVINO runtimes (None:
        traced from the torch backbone at first use). Not saved.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"`` for extraction and the pixel search (torch runtime). Not saved.
    joint_levels
        False (the paper: each level matched on its own, maps averaged) or True (opt-in, as
        PatchCore/PaDiM: the levels upsampled to the finest one's grid and concatenated after the
        ``patch_size`` averaging, so one match must hold at every scale; one map).
    gallery
        ``"knn"`` (the paper: the pixel features of the ``k`` nearest normal images) or ``"all"``
        (opt-in, as PatchCore: every training image's pixel features, or their coreset).
    coreset
        None (keep every position) or a fraction in (0, 1]: with ``gallery="all"``, keep that
        fraction of the positions, chosen by greedy k-center (:mod:`spade_ad.coreset`) seeded with
        ``coreset_seed``; the choice is saved with the model.
    coreset_seed
        seed of the coreset's first position (and of its random projection).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        k: int = 50,
        kappa: int = 1,
        levels: Sequence[int] = (1, 2, 3),
        sigma: float = 4.0,
        image_size: int = 256,
        crop_size: int = 224,
        weights: str | os.PathLike | None = None,
        batch_size: int = 16,
        progress: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_score: str = "knn",
        image_k: int | None = None,
        patch_size: int | Sequence[int] = 1,
        precision: str = "fp32",
        window: int | None = None,
        bank_dtype: str = "float32",
        geometry: str = "squash",
        runtime: str = "torch",
        export_dir: str | os.PathLike | None = None,
        device: str = "cpu",
        joint_levels: bool = False,
        gallery: str = "knn",
        coreset: float | None = None,
        coreset_seed: int = 0,
    ) -> None:
        self.backbone = backbone
        self.k = k
        self.kappa = kappa
        self.levels = levels
        self.sigma = sigma
        self.image_size = image_size
        self.crop_size = crop_size
        self.weights = weights
        self.batch_size = batch_size
        self.progress = progress
        self.max_pixels = max_pixels
        self.image_score = image_score
        self.image_k = image_k
        self.patch_size = patch_size
        self.precision = precision
        self.window = window
        self.bank_dtype = bank_dtype
        self.geometry = geometry
        self.runtime = runtime
        self.export_dir = export_dir
        self.device = device
        self.joint_levels = joint_levels
        self.gallery = gallery
        self.coreset = coreset
        self.coreset_seed = coreset_seed

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SPADE:
        """A model with the named preset's settings (see :mod:`spade_ad.presets`), plus ``overrides``."""
        from .presets import PRESETS

        if name not in PRESETS:
            raise SpadeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        crop, size = PRESETS[name].get("crop_size"), overrides.get("image_size")
        if crop is not None and "crop_size" not in overrides and isinstance(size, int) and crop > size:
            # Only the preset's crop is left over a smaller image_size: say where the crop came from.
            raise SpadeError(f"preset {name!r} crops {crop} px, larger than image_size {size}; give crop_size too")
        return cls(**{**PRESETS[name], **overrides})

    # ----------------------------------------------------------------------------------------
    # validation and shared pieces
    # ----------------------------------------------------------------------------------------
    def _validate(self) -> None:
        backbone_info(self.backbone)  # unknown name -> WeightsError listing the choices
        for name in ("k", "kappa", "image_size", "crop_size", "batch_size", "max_pixels"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise SpadeError(f"{name} must be a positive integer, got {v!r}")
        lv = tuple(self.levels)
        if not lv or any(x not in (1, 2, 3) for x in lv) or len(set(lv)) != len(lv):
            raise SpadeError(f"levels must be distinct values from 1, 2, 3 (strides 4, 8, 16), got {self.levels!r}")
        if not (isinstance(self.sigma, (int, float)) and self.sigma >= 0):
            raise SpadeError(f"sigma must be a number >= 0, got {self.sigma!r}")
        if self.image_score not in IMAGE_SCORES:
            raise SpadeError(f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {self.image_score!r}")
        if self.image_k is not None and (not isinstance(self.image_k, (int, np.integer)) or self.image_k < 1):
            raise SpadeError(f"image_k must be None or a positive integer, got {self.image_k!r}")
        ps = self.patch_size
        sizes = list(ps) if isinstance(ps, (list, tuple)) else [ps]  # anything else fails the int check below
        if (
            not sizes
            or any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1 or p % 2 == 0 for p in sizes)
            or (isinstance(ps, (list, tuple)) and len(sizes) != len(lv))
        ):
            raise SpadeError(
                f"patch_size must be an odd positive integer or one per level ({len(lv)} here), got {ps!r}"
            )
        if self.crop_size > self.image_size:
            raise SpadeError(f"crop_size {self.crop_size} is larger than image_size {self.image_size}")
        if self.precision not in PRECISIONS:
            raise SpadeError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.window is not None:
            if not isinstance(self.window, (int, np.integer)) or isinstance(self.window, bool) or self.window < 0:
                raise SpadeError(f"window must be None or an integer radius >= 0, got {self.window!r}")
            if self.kappa != 1:
                raise SpadeError("window search finds one nearest feature per pixel: it needs kappa=1")
        if self.geometry not in GEOMETRIES:
            raise SpadeError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {self.geometry!r}")
        if self.runtime not in RUNTIMES:
            raise SpadeError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.device not in DEVICES:
            raise SpadeError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.bank_dtype not in BANK_DTYPES:
            raise SpadeError(f"bank_dtype must be one of {', '.join(BANK_DTYPES)}, got {self.bank_dtype!r}")
        if not isinstance(self.joint_levels, bool):
            raise SpadeError(f"joint_levels must be True or False, got {self.joint_levels!r}")
        if self.gallery not in GALLERIES:
            raise SpadeError(f"gallery must be one of {', '.join(GALLERIES)}, got {self.gallery!r}")
        if self.gallery == "all" and self.window is not None:
            raise SpadeError("window search compares each image with its own K neighbours: it needs gallery='knn'")
        if self.coreset is not None:
            if self.gallery != "all":
                raise SpadeError("coreset subsamples the gallery of every training image: it needs gallery='all'")
            c = self.coreset
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
                raise SpadeError(f"coreset must be None or a fraction in (0, 1], got {c!r}")
        if not isinstance(self.coreset_seed, (int, np.integer)) or isinstance(self.coreset_seed, bool):
            raise SpadeError(f"coreset_seed must be an integer, got {self.coreset_seed!r}")

    @property
    def _prep(self) -> Preprocessing:
        return Preprocessing(self.image_size, self.crop_size, self.max_pixels, self.geometry)

    def _get_backbone(self) -> Backbone | RuntimeBackbone | DeviceBackbone:
        # Built lazily and cached: a loaded model rebuilds its backbone only when first used.
        bb = getattr(self, "_backbone", None)
        if bb is None:
            bb = runtime_backbone(
                self.runtime,
                lambda: build_backbone(self.backbone, self.weights),
                backbone_info(self.backbone),
                self.crop_size,
                tuple(self.levels),
                self.export_dir,
                self.device,
            )
            self._check_weights(bb)
            self._backbone: Backbone | RuntimeBackbone | DeviceBackbone | None = (
                bb  # None after load(): rebuilt on first use
            )
        return bb

    def _check_weights(self, bb: Backbone | RuntimeBackbone | DeviceBackbone) -> None:
        expected = getattr(self, "weights_sha256_", None)
        if expected is not None and bb.weights_sha256 != expected:
            raise WeightsError(
                f"{bb.weights_source}: {self.backbone} weights differ from those the model was fitted "
                f"with (sha256 {bb.weights_sha256[:12]}... vs {expected[:12]}...); use the same weights"
            )

    def export(self, folder: str | os.PathLike, format: str = "onnx", overwrite: bool = False) -> Path:
        """Write this model's backbone (its levels and the global pool, at its crop size) as ONNX or OpenVINO
        IR into ``folder``, for ``runtime="onnxruntime"``/``"openvino"`` with ``export_dir`` (see
        :mod:`spade_ad.runtimes`). The torch weights must be those the model was fitted with."""
        self._validate()
        bb = build_backbone(self.backbone, self.weights)
        self._check_weights(bb)
        return export_backbone(bb, self.crop_size, tuple(self.levels), format, folder, overwrite)

    def _extract(self, images: Any, desc: str) -> tuple[Features, list[str]]:
        items, names = as_image_list(images)
        feats = extract_features(
            self._get_backbone(),
            items,
            names,
            self._prep,
            tuple(self.levels),
            self.batch_size,
            self.progress,
            desc,
            patch_size=self.patch_size,
            joint=self.joint_levels,
        )
        return feats, names

    def _check_fitted(self) -> None:
        if getattr(self, "bank_", None) is None:
            raise NotFittedError("this SPADE model is not fitted yet: call fit() or SPADE.load() first")

    # ----------------------------------------------------------------------------------------
    # public API
    # ----------------------------------------------------------------------------------------
    def fit(self, train: Any, calibrate: float | None = None) -> SPADE:
        """Store the features of normal images: a folder, a list of paths/arrays, or an array batch.

        ``calibrate``: hold out this fraction of the images (seeded split), fit on the rest, and set
        image/pixel thresholds from the held-out images' scores (see :mod:`spade_ad.thresholds`).
        """
        if calibrate is not None:
            items, _ = as_image_list(train)
            keep, hold = split_holdout(items, calibrate)
            self.fit(keep)
            return self.calibrate(hold)
        self._validate()
        # Refitting starts from scratch (the weights may have changed); a failed fit leaves the model unfitted.
        for attr in ("bank_", "k_", "image_k_", "weights_sha256_", "_backbone", "thresholds_", "_device_levels"):
            self.__dict__.pop(attr, None)
        feats, names = self._extract(train, "fit")
        n = len(names)
        if n < self.k:
            warnings.warn(
                f"only {n} training images for k={self.k}: using all {n} as neighbours",
                SpadeWarning,
                stacklevel=2,
            )
        dtype = BANK_DTYPES[self.bank_dtype]
        self.bank_ = FeatureBank(feats.global_, [lv.to(dtype) for lv in feats.levels], names)
        if self.coreset is not None:
            self.bank_.coresets = [self._select_coreset(lv) for lv in feats.levels]
        self.k_ = min(self.k, n)
        self.image_k_ = min(self.image_k or self.k, n)
        self.weights_sha256_ = self._get_backbone().weights_sha256
        self.thresholds_: Thresholds | None = None
        self.version_ = 0
        self.history_: list[dict[str, Any]] = []
        self._record("fit", n_added=n)
        return self

    def fit_features(self, bank: FeatureBank, weights_sha256: str) -> SPADE:
        """Use features extracted elsewhere (e.g. by Ray workers, :mod:`spade_ad.distributed`) as the fitted
        bank; ``weights_sha256``: the hash of the backbone weights that extracted them."""
        self._validate()
        self.__dict__.pop("_backbone", None)
        n = len(bank)
        self.bank_, self.k_, self.image_k_ = bank, min(self.k, n), min(self.image_k or self.k, n)
        self.weights_sha256_, self.thresholds_ = weights_sha256, None
        return self

    def _select_coreset(self, level: torch.Tensor) -> torch.Tensor:
        """Flat positions (M,) kept of one level's (N, h, w, C) features (greedy k-center, seeded)."""
        from .coreset import coreset_size, greedy_kcenter, project

        flat = level.reshape(-1, level.shape[-1])
        assert self.coreset is not None
        x = project(flat, self.coreset_seed)
        return greedy_kcenter(x, coreset_size(len(flat), self.coreset), seed=self.coreset_seed)

    def calibrate(
        self,
        normal_images: Any,
        image_quantile: float = DEFAULT_IMAGE_QUANTILE,
        pixel_quantile: float = DEFAULT_PIXEL_QUANTILE,
    ) -> SPADE:
        """Set thresholds from normal images that are **not** in the bank (quantiles of their scores)."""
        pred = self.predict(normal_images)
        maps = pred.anomaly_maps if pred.valid is None else pred.anomaly_maps[pred.valid]
        self.thresholds_ = calibrate_thresholds(pred.image_scores, maps, image_quantile, pixel_quantile)
        return self

    def set_thresholds(self, thresholds: Thresholds | None) -> SPADE:
        """Use these thresholds (e.g. from :func:`spade_ad.thresholds.f1_thresholds` on validation data)."""
        self._check_fitted()
        self.thresholds_ = thresholds
        return self

    @property
    def train_paths_(self) -> list[str]:
        """Names of the training images, in the order ``neighbors`` indices refer to."""
        self._check_fitted()
        return self.bank_.paths

    def extract(self, images: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Features exactly as ``predict`` uses them: global (N, D) and per level (N, C, h, w)."""
        self._validate()
        feats, _ = self._extract(images, "extract")
        return feats.global_, [lv.permute(0, 3, 1, 2) for lv in feats.levels]

    def predict(self, images: Any, segment_above: float | None = None) -> Prediction:
        """Image scores, anomaly maps (N, crop, crop) and neighbour indices for ``images``.

        ``segment_above``: the paper's deployment mode -- run the pixel stage only for images whose
        kNN image score exceeds this value (needs ``image_score="knn"``); the others get NaN maps and
        ``segmented=False``. Images are processed in chunks, so memory holds the maps but not every
        image's features.
        """
        self._check_fitted()
        self._validate()
        if segment_above is not None and self.image_score != "knn":
            raise SpadeError(
                f"segment_above needs image_score='knn' (the score must be known before the pixel stage); "
                f"this model uses {self.image_score!r}"
            )
        items, names = as_image_list(images)
        n = len(names)
        scores = np.empty(n, dtype=np.float64)
        neighbors = np.empty((n, self.k_), dtype=np.int64)
        nb_dist2 = np.empty((n, self.k_), dtype=np.float64)
        maps = np.empty((n, self.crop_size, self.crop_size), dtype=np.float32)
        segmented = np.ones(n, dtype=bool)
        valid = self.valid_regions(items, names)
        chunk = max(self.batch_size, 64)
        with tqdm(total=n, desc="predict", unit="img", disable=not self.progress, leave=False) as bar:
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                feats = extract_features(
                    self._get_backbone(),
                    items[start:stop],
                    names[start:stop],
                    self._prep,
                    tuple(self.levels),
                    self.batch_size,
                    progress=False,
                    patch_size=self.patch_size,
                    joint=self.joint_levels,
                )
                knn_score, nb, dist2 = self._knn(feats.global_)
                neighbors[start:stop] = nb.numpy()
                nb_dist2[start:stop] = dist2
                for j in range(stop - start):
                    if segment_above is not None and not knn_score[j] > segment_above:
                        segmented[start + j] = False
                        maps[start + j] = np.nan
                    else:
                        maps[start + j] = self._anomaly_map(feats, j, nb[j])
                    bar.update(1)
                scores[start:stop] = self._image_score(
                    knn_score, maps[start:stop], None if valid is None else valid[start:stop]
                )
        flagged = None if self.thresholds_ is None else scores >= self.thresholds_.image
        return Prediction(scores, maps, neighbors, names, flagged, segmented, valid, nb_dist2)

    def valid_regions(self, images: Any, names: Sequence[str] | None = None) -> np.ndarray | None:
        """(N, crop, crop) bool: where each preprocessed image shows the image itself (None for
        ``geometry="squash"``, where that is everywhere). Reads only image headers."""
        if self.geometry == "squash":
            return None
        items, found = as_image_list(images) if names is None else (images, names)
        return np.stack(
            [
                valid_region(*item_size(it, nm), self.image_size, self.crop_size, self.geometry)
                for it, nm in zip(items, found, strict=True)
            ]
        )

    def _knn(self, global_: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """(kNN image score over the ``image_k_`` nearest, the ``k_`` nearest training indices, their
        squared global distances)."""
        dist2, nb = knn_images(global_, self.bank_.global_, max(self.k_, self.image_k_), self.bank_.global_sq_norms())
        # Paper: image score = mean squared Euclidean distance to the K nearest normal images.
        return dist2[:, : self.image_k_].mean(dim=1).numpy(), nb[:, : self.k_], dist2[:, : self.k_].numpy()

    def _image_score(self, knn_score: np.ndarray, maps: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """The configured image score from the kNN score and the (smoothed) anomaly maps."""
        if self.image_score == "knn":
            return knn_score
        if valid is not None:
            maps = np.where(valid, maps, -np.inf)  # padding is not part of the image
        map_max = maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)
        return map_max if self.image_score == "map_max" else np.sqrt(knn_score) * map_max

    def _level_maps(
        self,
        test_levels: list[torch.Tensor],
        neighbors: torch.Tensor,
        with_source: bool = False,
        level_index: list[int] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level, each test pixel's distance to its nearest gallery feature, (h, w) each.

        ``test_levels``: one (h, w, C) tensor per level for one image; ``neighbors``: its K nearest
        training images. The gallery is every pixel feature of those images at that level. With
        ``with_source`` (kappa = 1 only), also the flat gallery index of each match:
        ``index = (neighbor rank * h + y) * w + x``. ``level_index``: which of the bank's levels each
        entry of ``test_levels`` is (default: all of them, in order).
        """
        maps, sources = [], []
        for i, test_lv in enumerate(test_levels):
            h, w, c = test_lv.shape
            level = level_index[i] if level_index else i
            if self.gallery == "all":
                # Every training image's features (or their coreset); sources are flat positions
                # (image * h + y) * w + x in the whole bank, not ranks among the neighbours. On the CPU.
                memory, keep = self.bank_.memory(level)
                if with_source or self.kappa == 1:
                    d, idx = nearest_neighbors(test_lv.reshape(-1, c), memory, self.precision)
                    sources.append((idx if keep is None else keep[idx]).reshape(h, w))
                else:
                    d = nearest_distances(test_lv.reshape(-1, c), memory, self.kappa, self.precision)
                maps.append(d.reshape(h, w))
                continue
            # A GPU (device="cuda"/"auto" with one) runs the kappa = 1 search; kappa > 1 stays on the CPU.
            on_device = self.device != "cpu" and self.kappa == 1 and resolve_device(self.device).type != "cpu"
            gallery = self._device_gallery(level, neighbors) if on_device else self.bank_.gallery(level, neighbors)
            if on_device:
                d, idx = device_search(test_lv, gallery, self.window)
            elif self.window is not None:
                d, idx = window_search(test_lv, gallery, self.window)
            elif with_source or self.kappa == 1:
                d, idx = nearest_neighbors(test_lv.reshape(-1, c), gallery.reshape(-1, c), self.precision)
            else:
                d = nearest_distances(test_lv.reshape(-1, c), gallery.reshape(-1, c), self.kappa, self.precision)
            if with_source:
                sources.append(idx.reshape(h, w))
            maps.append(d.reshape(h, w))
        return maps, sources

    def _device_gallery(self, level: int, neighbors: torch.Tensor) -> torch.Tensor:
        """The K neighbours' features at one level on the search device (from a device copy of the bank
        when it fits there, else gathered on the CPU and copied)."""
        dev = resolve_device(self.device)
        if "_device_levels" not in self.__dict__:
            self._device_levels = device_levels(self.bank_.levels, dev)
        if self._device_levels is not None:
            return self._device_levels[level][neighbors.to(dev)].to(torch.float32)
        return self.bank_.gallery(level, neighbors).to(dev)

    def _finish_map(self, level_maps: list[torch.Tensor]) -> np.ndarray:
        """Upsample to the crop size, average the levels, smooth."""
        return smooth(combine_levels(level_maps, self.crop_size).numpy(), self.sigma)

    def _anomaly_map(self, feats: Features, i: int, neighbors: torch.Tensor) -> np.ndarray:
        """One image's anomaly map (crop, crop)."""
        level_maps, _ = self._level_maps([lv[i] for lv in feats.levels], neighbors)
        return self._finish_map(level_maps)

    def train_image(self, i: int) -> np.ndarray:
        """Training image ``i`` preprocessed as the model sees it, (3, crop, crop) in [0, 1].

        Only for models fitted on files (the model stores names, not pixels).
        """
        self._check_fitted()
        path = self.bank_.paths[i]
        if path.startswith("array["):
            raise SpadeError(f"training image {i} was an in-memory array; its pixels were not kept")
        return load_preprocessed(path, path, self.image_size, self.crop_size, self.max_pixels, self.geometry)

    def explain(self, images: Any) -> list[Explanation]:
        """Why each image scored as it did: its nearest normal images and, at the finest level,
        which training image and position each test pixel's nearest feature came from."""
        self._check_fitted()
        self._validate()
        feats, names = self._extract(images, "explain")
        knn_score, nb, dist2 = self._knn(feats.global_)  # the same search (and cached norms) as predict
        # Smallest level number = smallest stride; joint features are one level on the finest grid.
        finest = 0 if self.joint_levels else int(np.argmin(self.levels))
        out = []
        for i, name in enumerate(names):
            test_lv = feats.levels[finest][i]
            maps, sources = self._level_maps([test_lv], nb[i], with_source=True, level_index=[finest])
            h, w, _ = test_lv.shape
            flat = sources[0]
            rank, rest = flat // (h * w), flat % (h * w)
            # gallery "all": the position is in the whole bank, so its image index is the training index.
            source = rank if self.gallery == "all" else nb[i][rank]
            out.append(
                Explanation(
                    name=name,
                    knn_score=float(knn_score[i]),
                    neighbors=nb[i].numpy().astype(np.int64),
                    neighbor_sq_distances=dist2[i],
                    level=int(self.levels[finest]),
                    source_image=source.numpy().astype(np.int64),
                    source_y=(rest // w).numpy().astype(np.int64),
                    source_x=(rest % w).numpy().astype(np.int64),
                    distance=maps[0].numpy(),
                    stride=self.crop_size // h,
                )
            )
        return out

    # ----------------------------------------------------------------------------------------
    # the operator loop: grow or shrink the bank of a fitted model, versioned
    # ----------------------------------------------------------------------------------------
    def add_normal(self, images: Any, by: str | None = None) -> SPADE:
        """Append normal images (folder, paths, arrays) to the bank; returns ``self``.

        The result scores exactly as a model fitted from scratch on the old training images followed
        by these, in that order. Thresholds are kept (see :meth:`recalibrate`). The old bank is never
        modified: a new one replaces it, so ``copy.copy(model).add_normal(x)`` leaves ``model`` as it
        was (the service swaps models this way). ``by`` names who asked, for the history.
        """
        self._check_fitted()
        self._validate()
        feats, names = self._extract(images, "add")
        old, dtype = self.bank_, BANK_DTYPES[self.bank_dtype]
        levels: list[Level] = [
            torch.cat([lv.materialize() if isinstance(lv, MappedLevel) else lv, new.to(dtype)])
            for lv, new in zip(old.levels, feats.levels, strict=True)
        ]
        bank = FeatureBank(torch.cat([old.global_, feats.global_]), levels, [*old.paths, *names])
        self._set_bank(bank)
        self._record("add", n_added=len(names), names=names, by=by)
        return self

    def remove_normal(self, indices: Sequence[int] | int, by: str | None = None) -> SPADE:
        """Take training images out of the bank by index (as in ``train_paths_``); returns ``self``.

        Later images move down, so indices refer to the new order afterwards. The result scores
        exactly as a model fitted without those images. At least one image must stay.
        """
        self._check_fitted()
        n = len(self.bank_)
        idx = [indices] if isinstance(indices, (int, np.integer)) else list(indices)
        bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n]
        if bad or not idx:
            raise SpadeError(f"no training image {bad[0] if bad else '(none given)'}: the model has {n} (0..{n - 1})")
        if len(set(idx)) != len(idx):
            raise SpadeError(f"training image indices repeat: {sorted(idx)}")
        if len(idx) >= n:
            raise SpadeError(f"cannot remove all {n} training images: a model needs at least one")
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.tensor(idx, dtype=torch.long)] = False
        old = self.bank_
        rows = torch.nonzero(keep).reshape(-1)
        levels: list[Level] = [lv[rows] if isinstance(lv, MappedLevel) else lv[keep] for lv in old.levels]
        if any(isinstance(lv, MappedLevel) for lv in old.levels):
            # Mapped rows come back as float32; store them as the bank keeps them.
            levels = [lv.to(BANK_DTYPES[self.bank_dtype]) for lv in levels if isinstance(lv, torch.Tensor)]
        names = [old.paths[i] for i in sorted(idx)]
        self._set_bank(
            FeatureBank(old.global_[keep], levels, [p for p, k in zip(old.paths, keep.tolist(), strict=True) if k])
        )
        self._record("remove", n_removed=len(idx), names=names, by=by)
        return self

    def recalibrate(
        self,
        normal_images: Any,
        image_quantile: float = DEFAULT_IMAGE_QUANTILE,
        pixel_quantile: float = DEFAULT_PIXEL_QUANTILE,
        by: str | None = None,
    ) -> SPADE:
        """Re-set the thresholds after the bank changed, from held-out normal images that are **not**
        in the bank (as :meth:`calibrate`), and record it as a new version."""
        self._check_fitted()
        self.calibrate(normal_images, image_quantile, pixel_quantile)
        self._record("recalibrate", n_images=len(as_image_list(normal_images)[1]), by=by)
        return self

    @property
    def bank_sha256_(self) -> str:
        """sha256 of the bank's features and training names (computed once per bank)."""
        self._check_fitted()
        cached = getattr(self, "_bank_sha", None)
        if cached is None or cached[0] is not self.bank_:
            tensors = {"global": self.bank_.global_, **{f"level{i}": lv for i, lv in enumerate(self.bank_.levels)}}
            cached = (self.bank_, content_sha256(tensors, json.dumps(self.bank_.paths)))
            self._bank_sha = cached
        return cached[1]

    def version_info(self) -> dict[str, Any]:
        """``{"version", "bank_sha256", "history"}``: the change counter (0 for a model file written before
        versions existed), the bank's content hash, and the latest changes, oldest first."""
        self._check_fitted()
        return {
            "version": int(getattr(self, "version_", 0)),
            "bank_sha256": self.bank_sha256_,
            "history": list(getattr(self, "history_", [])),
        }

    def _set_bank(self, bank: FeatureBank) -> None:
        if self.coreset is not None:
            # The coreset is chosen from the whole bank, so a changed bank needs it chosen again, exactly
            # as a fit on the same images would (on float32 features, as fit does).
            bank.coresets = [self._select_coreset(lv.float()) for lv in bank.levels if isinstance(lv, torch.Tensor)]
        self.bank_ = bank
        self.k_ = min(self.k, len(bank))
        self.image_k_ = min(self.image_k or self.k, len(bank))

    def _record(self, action: str, names: Sequence[str] = (), by: str | None = None, **counts: int) -> None:
        """Bump the version and append a history entry (a new list: copies made before keep theirs)."""
        self.version_ = int(getattr(self, "version_", 0)) + 1
        entry: dict[str, Any] = {
            "version": self.version_,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "action": action,
            **counts,
            "n_train": len(self.bank_),
            "bank_sha256": self.bank_sha256_,
        }
        if names:
            entry["names"] = list(names[:HISTORY_NAMES]) + (
                [f"... {len(names) - HISTORY_NAMES} more"] if len(names) > HISTORY_NAMES else []
            )
        if by is not None:
            entry["by"] = by
        self.history_ = [*getattr(self, "history_", []), entry][-HISTORY_LENGTH:]

    # ----------------------------------------------------------------------------------------
    # persistence
    # ----------------------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model (saved in the model file)."""
        self._check_fitted()
        info = backbone_info(self.backbone)
        return {
            "backbone": self.backbone,
            "weights": None if self.weights is None else str(self.weights),
            "weights_sha256": self.weights_sha256_,
            "k": int(self.k),
            "kappa": int(self.kappa),
            "levels": [int(x) for x in self.levels],
            "sigma": float(self.sigma),
            "image_score": self.image_score,
            "image_k": None if self.image_k is None else int(self.image_k),
            "patch_size": (
                int(self.patch_size)
                if isinstance(self.patch_size, (int, np.integer))
                else [int(p) for p in self.patch_size]
            ),
            "precision": self.precision,
            "window": None if self.window is None else int(self.window),
            "bank_dtype": self.bank_dtype,
            "runtime": self.runtime,  # the default runtime only: any runtime scores the model the same
            "joint_levels": bool(self.joint_levels),
            "gallery": self.gallery,
            "coreset": None if self.coreset is None else float(self.coreset),
            "coreset_seed": int(self.coreset_seed),
            "preprocessing": {
                "image_size": int(self.image_size),
                "crop_size": int(self.crop_size),
                "resize": "bilinear, to a square" if self.geometry == "squash" else "bilinear, long side, padded",
                "geometry": self.geometry,
                "crop": "centre",
                "mean": list(info.mean),
                "std": list(info.std),
                "max_pixels": int(self.max_pixels),
            },
            "n_train": len(self.bank_),
            "package_version": __version__,
            "thresholds": None if self.thresholds_ is None else self.thresholds_.as_dict(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted model to one file (atomically); returns its path."""
        self._check_fitted()
        return save_model_file(path, self.bank_, {**self.get_config(), **self.version_info()})

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        weights: str | os.PathLike | None = None,
        progress: bool = False,
        mmap: bool = False,
        runtime: str | None = None,
        export_dir: str | os.PathLike | None = None,
        device: str = "cpu",
    ) -> SPADE:
        """Rebuild a model saved with :meth:`save`; the backbone weights must hash as when fitted.

        ``weights`` overrides where the backbone weights are read from (e.g. on another machine).
        ``mmap``: keep the pixel features in the file and read only each test image's K neighbours'
        maps (memory no longer grows with the training set; same results).
        ``runtime`` (default: the one saved with the model), ``export_dir``, ``device``: see :class:`SPADE`.
        """
        bank, cfg = load_model_file(path, mmap=mmap)
        try:
            prep = cfg["preprocessing"]
            model = cls(
                backbone=cfg["backbone"],
                k=cfg["k"],
                kappa=cfg["kappa"],
                levels=tuple(cfg["levels"]),
                sigma=cfg["sigma"],
                image_size=prep["image_size"],
                crop_size=prep["crop_size"],
                weights=weights if weights is not None else cfg["weights"],
                progress=progress,
                max_pixels=prep.get("max_pixels", DEFAULT_MAX_PIXELS),
                # Options added after format 1 was first written default to the paper's behaviour.
                image_score=cfg.get("image_score", "knn"),
                image_k=cfg.get("image_k"),
                patch_size=_patch_size_from_config(cfg.get("patch_size", 1)),
                precision=cfg.get("precision", "fp32"),
                window=cfg.get("window"),
                bank_dtype=cfg.get("bank_dtype", "float32"),
                geometry=prep.get("geometry", "squash"),
                runtime=runtime if runtime is not None else cfg.get("runtime", "torch"),
                export_dir=export_dir,
                device=device,
                joint_levels=cfg.get("joint_levels", False),
                gallery=cfg.get("gallery", "knn"),
                coreset=cfg.get("coreset"),
                coreset_seed=cfg.get("coreset_seed", 0),
            )
            expected_sha = cfg["weights_sha256"]
        except (KeyError, TypeError) as exc:
            raise ModelFileError(f"{path}: configuration is incomplete ({exc})") from None
        try:
            model._validate()
        except SpadeError as exc:
            raise ModelFileError(f"{path}: invalid configuration: {exc}") from None
        info = backbone_info(model.backbone)
        chans = tuple(info.channels[lv - 1] for lv in model.levels)
        if model.joint_levels:
            chans = (sum(chans),)
        if bank.global_.shape[1] != info.global_dim or tuple(lv.shape[-1] for lv in bank.levels) != chans:
            raise ModelFileError(f"{path}: feature sizes do not match backbone {model.backbone}")
        if any(lv.dtype != BANK_DTYPES[model.bank_dtype] for lv in bank.levels):
            raise ModelFileError(
                f"{path}: pixel features are not stored as {model.bank_dtype} as its configuration says"
            )
        model.bank_ = bank
        model.k_ = min(model.k, len(bank))
        model.image_k_ = min(model.image_k or model.k, len(bank))
        model.weights_sha256_ = expected_sha
        model._backbone = None
        # Files written before versions existed are version 0 with no history.
        version, history, sha = cfg.get("version", 0), cfg.get("history", []), cfg.get("bank_sha256")
        if not isinstance(version, int) or version < 0 or not isinstance(history, list):
            raise ModelFileError(f"{path}: invalid version {version!r} or history")
        model.version_, model.history_ = version, history
        if isinstance(sha, str):
            model._bank_sha = (bank, sha)  # the file checksum just verified the bank it describes
        th = cfg.get("thresholds")
        try:
            model.thresholds_ = None if th is None else Thresholds.from_dict(th)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: invalid thresholds ({exc})") from None
        return model
