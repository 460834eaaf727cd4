"""Run a backbone over images in batches: global vectors and the pyramid of pixel features."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .backbones import Backbone
from .data import DEFAULT_MAX_PIXELS, ImageLike, load_preprocessed
from .errors import FeatureError


@dataclass
class Preprocessing:
    """The geometry applied before the backbone (saved with the model)."""

    image_size: int = 256
    crop_size: int = 224
    max_pixels: int = DEFAULT_MAX_PIXELS
    geometry: str = "squash"


@dataclass
class Features:
    """Features of a set of images.

    ``global_``: (N, D) float32. ``levels``: one (N, h, w, C) float32 tensor per pyramid level,
    channels-last because the search treats every pixel as a C-dimensional point.
    """

    global_: torch.Tensor
    levels: list[torch.Tensor]


def iter_batches(
    items: Sequence[ImageLike],
    names: Sequence[str],
    prep: Preprocessing,
    batch_size: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start index, float32 (B, 3, crop, crop) in [0, 1]) batches, decoding in threads.

    Pillow releases the GIL while decoding and resizing, so two threads keep both cores busy
    while the backbone of the previous batch is not yet running.
    """

    def load(i: int) -> np.ndarray:
        return load_preprocessed(items[i], names[i], prep.image_size, prep.crop_size, prep.max_pixels, prep.geometry)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(items), batch_size):
            idx = range(start, min(start + batch_size, len(items)))
            arrays = list(pool.map(load, idx))
            yield start, torch.from_numpy(np.stack(arrays))


def check_finite(global_: torch.Tensor, levels: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Raise :class:`FeatureError` naming the first image whose features hold NaN or inf."""
    bad = ~torch.isfinite(global_).all(dim=1)
    for lv in levels:
        bad |= ~torch.isfinite(lv.flatten(1)).all(dim=1)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise FeatureError(f"{names[i]}: features contain NaN or infinite values (check the image data)")


def joint_levels(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, sum C, h, w): the (N, C, h, w) levels bilinearly upsampled (align_corners=False, as PatchCore)
    to the largest grid among them and concatenated in the given order, so that one vector per position
    holds every scale and a match must hold at all of them at once."""
    h, w = max((lv.shape[-2], lv.shape[-1]) for lv in levels)
    return torch.cat(
        [
            lv if lv.shape[-2:] == (h, w) else F.interpolate(lv, size=(h, w), mode="bilinear", align_corners=False)
            for lv in levels
        ],
        dim=1,
    )


def per_level_patch_sizes(patch_size: int | Sequence[int], n_levels: int) -> list[int]:
    """One averaging size per level: an int applies to every level; a sequence must have one per level."""
    if isinstance(patch_size, (int, np.integer)):
        return [int(patch_size)] * n_levels
    sizes = [int(p) for p in patch_size]
    if len(sizes) != n_levels:
        raise ValueError(f"patch_size has {len(sizes)} sizes for {n_levels} levels")
    return sizes


def extract_features(
    backbone: Backbone | Callable[[torch.Tensor], tuple[torch.Tensor, list[Any]]],
    items: Sequence[ImageLike],
    names: Sequence[str],
    prep: Preprocessing,
    level_ids: Sequence[int],
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "features",
    patch_size: int | Sequence[int] = 1,
    joint: bool = False,
) -> Features:
    """Backbone features for ``items`` (paths or arrays): global vectors and the chosen levels.

    ``patch_size`` > 1 averages every pixel feature over its patch_size x patch_size neighbourhood
    (stride 1, borders averaged over the pixels that exist), as PatchCore's locally aware features;
    1 is the paper's plain per-pixel feature; a sequence gives one size per level, in ``level_ids``'
    order. ``joint``: one level only, the chosen levels upsampled
    to the finest one's grid and concatenated (see :func:`joint_levels`).
    """
    n = len(items)
    sizes = per_level_patch_sizes(patch_size, len(level_ids))
    g_out: torch.Tensor | None = None
    lv_out: list[torch.Tensor] = []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start, x in iter_batches(items, names, prep, batch_size):
            g, levels = backbone(x)
            chosen = [levels[i - 1] for i in level_ids]
            chosen = [
                F.avg_pool2d(lv, p, stride=1, padding=p // 2, count_include_pad=False) if p > 1 else lv
                for lv, p in zip(chosen, sizes, strict=True)
            ]
            if joint:
                chosen = [joint_levels(chosen)]
            chosen = [lv.permute(0, 2, 3, 1) for lv in chosen]
            check_finite(g, chosen, names[start : start + x.shape[0]])
            if g_out is None:
                # Allocate once the shapes are known: no list of batches, no final concatenation copy.
                g_out = torch.empty((n, g.shape[1]), dtype=torch.float32)
                lv_out = [torch.empty((n, *c.shape[1:]), dtype=torch.float32) for c in chosen]
            g_out[start : start + x.shape[0]] = g
            for dst, src in zip(lv_out, chosen, strict=True):
                dst[start : start + x.shape[0]] = src
            bar.update(x.shape[0])
    assert g_out is not None
    return Features(g_out, lv_out)
