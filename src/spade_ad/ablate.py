"""Ablations of SPADE on one dataset: the kind of study in the paper's tables 6 and 7 (ablations).

Groups of rows, each varying one setting around the paper's configuration (all pyramid levels,
K = k = 50 nearest normal images, kappa = 1, sigma = 4), everything else fixed:

* ``levels`` -- which pyramid levels make the anomaly map: stride 16, stride 8, stride 4, all
  (the pyramid-level ablation, paper table 6);
* ``gallery`` -- the pixel gallery taken from the K nearest normal images vs K random normal
  images (seeded, drawn per test image without replacement). The image score of the random row
  stays the kNN score: only the pixel gallery changes, so its image AUROC equals the nearest row's;
* ``k`` -- number of nearest normal images, used both for the image score and as the gallery;
* ``sigma`` -- Gaussian smoothing of the anomaly map (0 = none).

The gallery, k and sigma groups are the ablations around the paper's table 7. The numbers are this
implementation's on the data given; nothing here claims to reproduce the paper's figures.

Cost: the backbone runs exactly once over the training images and once over the test images.
The image-level kNN search runs once (for the largest k); per-level distance maps of the paper
setting are computed once, and the level rows, sigma rows and the paper setting itself are derived
from them (combine the chosen levels, smooth). Only k rows other than the paper's k and the random
row search the pixel galleries again. A configuration that appears in several groups (the paper
setting appears in levels, k and sigma) is computed once and shown in each.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Dataset
from .errors import SpadeError
from .evaluate import load_masks
from .maps import combine_levels, smooth
from .metrics import image_auroc, pixel_auroc, pro_auc
from .model import SPADE, SpadeWarning
from .search import knn_images

#: Pyramid levels (model numbering) and their strides.
ALL_LEVELS: tuple[int, ...] = (1, 2, 3)
_STRIDE = {1: 4, 2: 8, 3: 16}

GROUP_TITLES: dict[str, str] = {
    "levels": "Pyramid levels",
    "gallery": "Pixel gallery: K nearest vs K random normal images",
    "k": "k nearest normal images (image score and gallery)",
    "sigma": "Smoothing sigma",
}


@dataclass(frozen=True)
class _Config:
    """One distinct computation; rows showing the same config share its result."""

    levels: tuple[int, ...]
    k: int
    gallery: str  # "nearest" or "random"
    sigma: float


@dataclass
class AblationRow:
    """One row of the ablation table.

    ``seconds``: work specific to this configuration (maps, metrics and any new pixel search); the
    backbone passes are shared and reported in :class:`AblationResult`. ``maps`` / ``image_scores``
    are kept only with ``run_ablation(..., keep_maps=True)`` and never go to JSON.
    """

    group: str
    setting: str
    image_auroc: float
    pixel_auroc: float | None
    pro: float | None
    seconds: float
    default: bool
    levels: tuple[int, ...]
    k: int
    gallery: str
    sigma: float
    maps: np.ndarray | None = field(default=None, repr=False)
    image_scores: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "setting": self.setting,
            "image_auroc": self.image_auroc,
            "pixel_auroc": self.pixel_auroc,
            "pro": self.pro,
            "seconds": round(self.seconds, 3),
            "default": self.default,
            "levels": list(self.levels),
            "strides": [_STRIDE[lv] for lv in self.levels],
            "k": self.k,
            "gallery": self.gallery,
            "sigma": self.sigma,
        }


@dataclass
class AblationResult:
    """All rows, in group order, with what is needed to read them."""

    category: str
    rows: list[AblationRow]
    n_train: int
    n_test: int
    seed: int
    k: int  # the paper-setting k actually used (capped at the number of training images)
    sigma: float
    config: dict[str, Any]
    fit_seconds: float  # backbone over the training images
    test_features_seconds: float  # backbone over the test images
    total_seconds: float

    def groups(self) -> list[str]:
        """Group names in display order."""
        return list(dict.fromkeys(r.group for r in self.rows))

    def notes(self) -> list[str]:
        """Footnotes shared by the text and Markdown renderings."""
        notes = [
            (
                f"* base setting, the paper's unless the base model changes it (all levels, k={self.k}, "
                f"kappa={self.config.get('kappa', 1)}, sigma={_num(self.sigma)}): computed once, shown in each group"
            ),
            (
                "K random: the pixel gallery is K random normal images per test image "
                f"(seed {self.seed}); the image score stays the kNN score"
            ),
            (
                f"seconds: row-specific work; shared backbone passes: train {self.fit_seconds:.1f} s, "
                f"test {self.test_features_seconds:.1f} s; total {self.total_seconds:.1f} s"
            ),
            "ablations of the kind in paper tables 6 and 7; numbers are this implementation's on this data",
        ]
        if self.k >= self.n_train:
            notes.insert(2, f"K={self.k} is every training image: the random and nearest galleries coincide")
        return notes

    def as_table(self) -> str:
        """Plain text, aligned columns, one block per group, the paper setting marked with ``*``."""
        width = max(len(r.setting) for r in self.rows) + 2
        head = f"{'setting':<{width}} {'image AUROC':>11} {'pixel AUROC':>11} {'PRO':>7} {'seconds':>8}"
        lines = [
            f"SPADE ablations: {self.category} ({self.n_train} train, {self.n_test} test images)",
            head,
            "-" * len(head),
        ]
        for g in self.groups():
            lines.append(GROUP_TITLES.get(g, g))
            for r in self.rows:
                if r.group == g:
                    label = ("* " if r.default else "  ") + r.setting
                    lines.append(
                        f"{label:<{width}} {_fmt(r.image_auroc):>11} {_fmt(r.pixel_auroc):>11} "
                        f"{_fmt(r.pro):>7} {r.seconds:>8.2f}"
                    )
        lines.append("")
        lines.extend(self.notes())
        return "\n".join(lines) + "\n"

    def as_markdown(self) -> str:
        """Markdown: one table per group, the paper setting in bold and marked with ``*``."""
        out = [
            f"## SPADE ablations: {self.category}",
            "",
            f"{self.n_train} training and {self.n_test} test images.",
            "",
        ]
        for g in self.groups():
            out += [
                f"### {GROUP_TITLES.get(g, g)}",
                "",
                "| setting | image AUROC | pixel AUROC | PRO | seconds |",
                "|---|---:|---:|---:|---:|",
            ]
            for r in self.rows:
                if r.group == g:
                    label = f"**{r.setting}** \\*" if r.default else r.setting
                    out.append(
                        f"| {label} | {_fmt(r.image_auroc)} | {_fmt(r.pixel_auroc)} | {_fmt(r.pro)} | {r.seconds:.2f} |"
                    )
            out.append("")
        # A leading "*" would start Markdown emphasis: escape it.
        out += ["- " + ("\\" + n if n.startswith("*") else n) for n in self.notes()]
        return "\n".join(out) + "\n"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record (no maps)."""
        return {
            "category": self.category,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "seed": self.seed,
            "k": self.k,
            "sigma": self.sigma,
            "config": self.config,
            "fit_seconds": round(self.fit_seconds, 3),
            "test_features_seconds": round(self.test_features_seconds, 3),
            "total_seconds": round(self.total_seconds, 3),
            "rows": [r.as_dict() for r in self.rows],
            "notes": self.notes(),
        }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _num(x: float) -> str:
    return f"{x:g}"


def _levels_label(levels: tuple[int, ...]) -> str:
    if levels == ALL_LEVELS:
        return "all (strides 4, 8, 16)"
    return ", ".join(f"stride {_STRIDE[lv]}" for lv in levels) + f" (level {', '.join(map(str, levels))})"


def random_galleries(n_test: int, n_train: int, k: int, seed: int) -> np.ndarray:
    """(n_test, k) random training indices, distinct within a row, one row per test image in order."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(n_train, size=k, replace=False) for _ in range(n_test)]).astype(np.int64)


def _plan(
    kc: int, sigma: float, ks: Sequence[int], sigmas: Sequence[float], n_train: int
) -> list[tuple[str, str, _Config]]:
    """(group, label, config) for every row, in display order."""
    centre = _Config(ALL_LEVELS, kc, "nearest", float(sigma))
    rows: list[tuple[str, str, _Config]] = []
    # Coarse to fine, then all, as the paper's table.
    for lv in ((3,), (2,), (1,), ALL_LEVELS):
        rows.append(("levels", _levels_label(lv), _Config(lv, kc, "nearest", float(sigma))))
    rows.append(("gallery", f"K={kc} nearest", centre))
    rows.append(("gallery", f"K={kc} random (image score: kNN)", _Config(ALL_LEVELS, kc, "random", float(sigma))))
    # k above the training set size means "all of them", as SPADE.fit does; the paper's k always shows.
    for k in sorted({min(int(k), n_train) for k in ks} | {kc}):
        rows.append(("k", f"k={k}", _Config(ALL_LEVELS, k, "nearest", float(sigma))))
    for s in sorted({float(s) for s in sigmas} | {float(sigma)}):
        rows.append(("sigma", f"sigma={_num(s)}", _Config(ALL_LEVELS, kc, "nearest", s)))
    return rows


def run_ablation(
    ds: Dataset,
    base: SPADE | None = None,
    seed: int = 0,
    progress: bool = False,
    ks: Sequence[int] = (1, 5, 10, 50),
    sigmas: Sequence[float] = (0, 2, 4, 8),
    keep_maps: bool = False,
) -> AblationResult:
    """Run the pyramid-level, nearest-vs-random gallery, k and sigma ablations on ``ds``.

    ``base``: the configuration to ablate around (its backbone, weights, k, kappa, sigma and
    geometry; default ``SPADE()``, the paper's). It is not modified: a fresh model with all three
    pyramid levels is fitted on ``ds.train``. ``seed``: the random galleries. ``ks`` / ``sigmas``:
    the values of those groups (k capped at the number of training images; the base's k and sigma
    are always included). ``keep_maps``: keep each row's anomaly maps and image scores (memory).
    """
    t_start = time.perf_counter()
    base = base if base is not None else SPADE()
    if tuple(sorted(base.levels)) != ALL_LEVELS:
        warnings.warn(
            f"the ablation varies the pyramid levels itself: base levels {tuple(base.levels)} are "
            "ignored and the paper setting uses all three",
            SpadeWarning,
            stacklevel=2,
        )
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise SpadeError(f"ks must be positive integers, got {tuple(ks)!r}")
    if any(isinstance(s, bool) or not isinstance(s, (int, float)) or not s >= 0 for s in sigmas):
        raise SpadeError(f"sigmas must be numbers >= 0, got {tuple(sigmas)!r}")
    if not ds.train or not ds.test:
        raise SpadeError(f"{ds.name}: the ablation needs training and test images")
    model = SPADE(
        backbone=base.backbone,
        k=base.k,
        kappa=base.kappa,
        levels=ALL_LEVELS,
        sigma=base.sigma,
        image_size=base.image_size,
        crop_size=base.crop_size,
        weights=base.weights,
        batch_size=base.batch_size,
        progress=progress,
        max_pixels=base.max_pixels,
    )
    # The only two backbone passes: all levels are extracted, so every level row reuses them.
    model.fit(ds.train)
    t_fit = time.perf_counter()
    test, _ = model._extract([t.path for t in ds.test], "test")
    t_test = time.perf_counter()

    n_train, n_test, crop = len(model.bank_), len(ds.test), model.crop_size
    kc = model.k_
    plan = _plan(kc, float(model.sigma), ks, sigmas, n_train)
    configs = list(dict.fromkeys(cfg for _, _, cfg in plan))
    centre = _Config(ALL_LEVELS, kc, "nearest", float(model.sigma))
    labels = np.array([t.label for t in ds.test], dtype=np.int64)
    masks = load_masks(ds, model.image_size, crop)
    has_pixels = masks is not None and bool(masks.any())

    # Image-level search once, for the largest k: the k nearest are a prefix of the K nearest
    # (topk is sorted), so every k row reads its neighbours and image score from this one result.
    k_max = max(cfg.k for cfg in configs)
    dist2, nb = knn_images(test.global_, model.bank_.global_, k_max)
    pixel_ks = sorted({cfg.k for cfg in configs if cfg.gallery == "nearest"} - {kc})
    searches = 1 + len(pixel_ks) + any(cfg.gallery == "random" for cfg in configs)
    bar = tqdm(total=searches * n_test + len(configs), desc="ablation", unit="step", disable=not progress, leave=False)

    def level_maps(galleries: torch.Tensor) -> list[list[torch.Tensor]]:
        """Unsmoothed per-level distance maps of every test image against its gallery images."""
        out = []
        for i in range(n_test):
            out.append(model._level_maps([lv[i] for lv in test.levels], galleries[i])[0])
            bar.update(1)
        return out

    def finish(per_image: list[list[torch.Tensor]], levels: tuple[int, ...], sigma: float) -> np.ndarray:
        # Same steps as SPADE._finish_map, on a subset of levels (kept in ascending level order,
        # the order a model with those levels combines them in).
        idx = [lv - 1 for lv in sorted(levels)]
        return np.stack([smooth(combine_levels([m[j] for j in idx], crop).numpy(), sigma) for m in per_image])

    def scores_for(k: int) -> np.ndarray:
        return dist2[:, :k].contiguous().mean(dim=1).numpy()

    try:
        # Per-level maps of the paper setting: searched once, then level, sigma and paper rows derive from them.
        t0 = time.perf_counter()
        centre_levels = level_maps(nb[:, :kc].contiguous())
        shared_search = time.perf_counter() - t0
        results: dict[_Config, tuple[float, float | None, float | None, float, Any, Any]] = {}
        for cfg in configs:
            t0 = time.perf_counter()
            if cfg.gallery == "random":
                per_image = level_maps(torch.from_numpy(random_galleries(n_test, n_train, cfg.k, seed)))
                scores = scores_for(cfg.k)  # the image score is not part of this ablation
            elif cfg.k == kc:
                per_image = centre_levels
                scores = scores_for(kc)
            else:
                per_image = level_maps(nb[:, : cfg.k].contiguous())
                scores = scores_for(cfg.k)
            maps = finish(per_image, cfg.levels, cfg.sigma)
            img = float(image_auroc(labels, scores))
            pix = pro = None
            if has_pixels and masks is not None:  # has_pixels implies masks; the check narrows the type
                pix = float(pixel_auroc(masks, maps))
                pro = float(pro_auc(masks, maps))
            secs = time.perf_counter() - t0 + (shared_search if cfg == centre else 0.0)
            # Maps are large (N x crop x crop per config): hold them only when asked to.
            results[cfg] = (img, pix, pro, secs, maps if keep_maps else None, scores if keep_maps else None)
            bar.update(1)
    finally:
        bar.close()

    rows = []
    for group, label, cfg in plan:
        img, pix, pro, secs, maps, scores = results[cfg]
        rows.append(
            AblationRow(
                group=group,
                setting=label,
                image_auroc=img,
                pixel_auroc=pix,
                pro=pro,
                seconds=secs,
                default=cfg == centre,
                levels=cfg.levels,
                k=cfg.k,
                gallery=cfg.gallery,
                sigma=cfg.sigma,
                maps=maps,
                image_scores=scores,
            )
        )
    config = {k: v for k, v in model.get_config().items() if k not in ("thresholds", "n_train")}
    return AblationResult(
        category=ds.name,
        rows=rows,
        n_train=n_train,
        n_test=n_test,
        seed=seed,
        k=kc,
        sigma=float(model.sigma),
        config=config,
        fit_seconds=t_fit - t_start,
        test_features_seconds=t_test - t_fit,
        total_seconds=time.perf_counter() - t_start,
    )
