"""Video frames as an anomaly-detection dataset: the paper's ShanghaiTech Campus (STC) setting.

Layout read by :func:`load_video_frames`::

    root/train/<video>/<frame images>            normal videos, one folder of frames each
    root/test/<video>/<frame images>             test videos
    root/test_masks/<video>/<frame stem>.png     per-frame masks, 0 = normal, 255 = anomalous pixel, or
    root/test_masks/<video>.npy                  one array per video, (n_frames, H, W), > 0 = anomalous

PNG masks are thresholded at half scale exactly as :func:`~spade_ad.data.read_mask` does for MVTec
(a 0/1 PNG, which that would read as empty, is refused); ``.npy`` arrays count any value > 0.

Frames are sorted by name in natural order (``2.png`` before ``10.png``), videos too; that order is
the order of the test set and of the frames in a ``.npy`` mask array.

Paper settings for this data (SPADE, Cohen & Hoshen 2020, STC experiment): each frame is an image;
the model is fitted on frames of the normal training videos, subsampled evenly because consecutive
frames are nearly identical and the full training set is hundreds of thousands of frames (here:
``train_frames``); the image score and the pixel gallery use only the single nearest training
frame, ``k=1`` (:data:`VIDEO_PRESET`; with a fixed camera per scene, the nearest normal frame
is the natural gallery); everything else (backbone pyramid levels, kappa=1, Gaussian sigma=4, resize 256 and
centre crop 224) is as in the paper's MVTec settings, i.e. the :class:`~spade_ad.model.SPADE`
defaults. Segmentation is scored with pixel AUROC against the per-frame masks
(:func:`load_video_masks`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .data import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    Dataset,
    TestItem,
    _open_checked,
    crop_box,
    image_size_of,
    list_images,
    read_mask,
)
from .errors import DatasetError, ImageError

__all__ = ["VIDEO_PRESET", "VideoDataset", "VideoFrame", "load_video_frames", "load_video_masks", "natural_key"]

#: SPADE options for video frames, on top of the defaults (which are the paper's MVTec settings).
VIDEO_PRESET: dict[str, int] = {"k": 1}

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[object, ...], str]:
    """Sort key putting ``2.png`` before ``10.png``; the full name breaks ties (``01`` vs ``1``)."""
    # re.split with a capturing group alternates text, number, text, ... so positions always
    # compare str with str and int with int.
    parts = tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGITS.split(name)))
    return parts, name


@dataclass
class VideoFrame(TestItem):
    """One test frame: ``defect`` is its video's name, ``index`` its position in the video.

    Its mask is ``mask_file`` (a PNG) or frame ``index`` of ``mask_array`` (a ``.npy``), or neither
    (all normal). ``mask`` (the generic field) stays None on purpose: generic code reads ``mask``
    with :func:`~spade_ad.data.read_mask`, which cannot read an ``.npy``; use :func:`load_video_masks`.
    """

    video: str = ""
    index: int = 0
    mask_file: Path | None = None
    mask_array: Path | None = None


@dataclass
class VideoDataset(Dataset):
    """A :class:`~spade_ad.data.Dataset` of video frames; ``test`` holds :class:`VideoFrame` items.

    ``n_train_total`` is the number of training frames before subsampling.
    """

    n_train_total: int = 0

    def load_masks(self, image_size: int, crop_size: int) -> np.ndarray:
        """Same as :func:`load_video_masks` (for code that asks the dataset for its masks)."""
        return load_video_masks(self, image_size, crop_size)


def _list_frames(folder: Path) -> list[Path]:
    """Frames of one video folder in natural order (DatasetError, naming it, if it has none)."""
    return sorted(list_images(folder), key=lambda p: natural_key(p.name))


def _video_dirs(folder: Path, what: str) -> list[Path]:
    """Video sub-folders of ``train`` or ``test``, natural order; error if missing or empty."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no {what} folder")
    videos = sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: natural_key(p.name)
    )
    if not videos:
        raise DatasetError(f"{folder}: no {what} videos (expected one sub-folder of frames per video)")
    return videos


def _subsample(frames: list[Path], train_frames: int | None) -> list[Path]:
    """``train_frames`` frames evenly spaced over all of them, first and last included."""
    if train_frames is None or train_frames >= len(frames):
        return list(frames)
    # Spacing (n-1)/(t-1) > 1 when t < n, so the rounded positions are already distinct; unique()
    # only guards against float rounding.
    idx = np.unique(np.linspace(0, len(frames) - 1, train_frames).round().astype(np.int64))
    return [frames[i] for i in idx]


def _png_mask_marks(path: Path) -> bool:
    """Whether a PNG mask marks any pixel, thresholded as :func:`read_mask` does (half full scale).

    A mask whose non-zero values all lie below that threshold (typically a 0/1 PNG) is refused:
    the label would say anomalous while the pixel mask read_mask gives is empty.
    """
    # _open_checked: the same missing-file, non-image, bomb and truncation checks as read_mask.
    img = _open_checked(path, DEFAULT_MAX_PIXELS)
    try:
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr, half = np.asarray(img), 32767
        else:
            arr, half = np.asarray(img.convert("L")), 127
    finally:
        img.close()
    top = int(arr.max())
    if 0 < top <= half:
        raise ImageError(
            f"{path}: mask has non-zero values but none above half scale (max {top}); "
            "PNG masks must mark anomalous pixels with 255 (65535 for 16-bit), or use an .npy array"
        )
    return top > half


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map an ``.npy`` mask array (pickles refused); DatasetError naming it if unreadable."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot be read as an .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise DatasetError(f"{path}: is not a single .npy array")
    return arr


def _check_npy(path: Path, frames: list[Path]) -> list[int]:
    """Validate a video's ``.npy`` masks against its frames; return the per-frame labels."""
    arr = _open_npy(path)
    if arr.ndim != 3:
        raise DatasetError(f"{path}: mask array has shape {arr.shape}, expected (n_frames, H, W)")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise DatasetError(f"{path}: mask array has non-numeric dtype {arr.dtype}")
    if arr.shape[0] != len(frames):
        raise DatasetError(
            f"{path}: mask array has {arr.shape[0]} frames but video {frames[0].parent} has {len(frames)}"
        )
    labels = []
    for i, f in enumerate(frames):
        w, h = image_size_of(f)
        if arr.shape[1:] != (h, w):
            raise ImageError(f"{path}: masks are {arr.shape[2]}x{arr.shape[1]} (WxH) but frame {f.name} is {w}x{h}")
        # One frame at a time: the whole comparison would materialise n_frames*H*W bools.
        m = np.asarray(arr[i])
        if np.issubdtype(m.dtype, np.floating) and not np.isfinite(m).all():
            raise DatasetError(f"{path}: mask of frame {i} ({f.name}) holds NaN or infinite values")
        labels.append(int((m > 0).any()))
    return labels


def _attach_png_masks(mask_dir: Path, items: list[VideoFrame]) -> None:
    """Match ``<frame stem>.png`` masks to frames; a mask without a frame is an error."""
    by_stem = {t.path.stem: t for t in items}
    seen: dict[str, Path] = {}
    for m in sorted(mask_dir.iterdir(), key=lambda p: natural_key(p.name)):
        if not m.is_file() or m.name.startswith(".") or m.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if m.stem in seen:
            raise DatasetError(f"{seen[m.stem]} and {m}: two masks for the same frame {m.stem!r}")
        seen[m.stem] = m
        t = by_stem.get(m.stem)
        if t is None:
            raise DatasetError(f"{m}: mask has no matching frame (expected {m.stem}.* in {items[0].path.parent})")
        fsz, msz = image_size_of(t.path), image_size_of(m)
        if fsz != msz:
            raise ImageError(f"{m}: mask is {msz[0]}x{msz[1]} but its frame {t.path.name} is {fsz[0]}x{fsz[1]}")
        t.mask_file = m
        t.label = int(_png_mask_marks(m))


def load_video_frames(
    root: str | os.PathLike, train_frames: int | None = None, name: str | None = None
) -> VideoDataset:
    """Read a video-frame dataset (layout in the module docstring) and check it up front.

    ``train_frames``: keep this many training frames, evenly spaced over all of them (all videos
    together, in order), as the paper subsamples STC; None keeps all.
    A test frame is anomalous (label 1) when its mask marks any pixel. A frame without a mask, and
    every frame of a test video with no mask at all (no folder, no ``.npy``), is normal, with an
    all-zero mask. Errors (DatasetError / ImageError) name the file: empty train or test, a mask
    without a frame, an ``.npy`` whose length is not the video's frame count, a mask whose size is
    not its frame's, a video with both a mask folder and an ``.npy``, masks for an unknown video.
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"{base}: no such dataset folder")
    if train_frames is not None and (
        not isinstance(train_frames, (int, np.integer)) or isinstance(train_frames, bool) or train_frames < 1
    ):
        raise DatasetError(f"train_frames must be a positive integer or None, got {train_frames!r}")

    all_train = [f for v in _video_dirs(base / "train", "training") for f in _list_frames(v)]

    mask_root = base / "test_masks"
    test: list[TestItem] = []
    test_videos = _video_dirs(base / "test", "test")
    names = {v.name for v in test_videos}
    if mask_root.is_dir():
        # Masks for a video that is not there would otherwise be ignored without a word.
        for m in sorted(mask_root.iterdir()):
            stem = m.stem if m.is_file() and m.suffix.lower() == ".npy" else m.name if m.is_dir() else None
            if stem is not None and not m.name.startswith(".") and stem not in names:
                raise DatasetError(f"{m}: masks for video {stem!r} but no folder {base / 'test' / stem}")
    for v in test_videos:
        frames = _list_frames(v)
        items = [VideoFrame(f, 0, v.name, video=v.name, index=i) for i, f in enumerate(frames)]
        mdir, npy = mask_root / v.name, mask_root / f"{v.name}.npy"
        if mdir.is_dir() and npy.is_file():
            raise DatasetError(f"{mdir} and {npy}: video {v.name!r} has both a mask folder and a mask array")
        if npy.is_file():
            for t, label in zip(items, _check_npy(npy, frames), strict=True):
                t.mask_array, t.label = npy, label
        elif mdir.is_dir():
            _attach_png_masks(mdir, items)
        test.extend(items)

    return VideoDataset(
        name=name or base.name,
        train=_subsample(all_train, train_frames),
        test=test,
        n_train_total=len(all_train),
    )


def _binary_to_crop(binary: np.ndarray, image_size: int, crop_size: int) -> np.ndarray:
    """Full-size bool mask -> bool (crop, crop), exactly as :func:`read_mask` does after thresholding."""
    m = Image.fromarray(binary.astype(np.uint8) * 255, "L").resize((image_size, image_size), Image.Resampling.NEAREST)
    left, top, right, bottom = crop_box(image_size, crop_size)
    return np.asarray(m)[top:bottom, left:right] > 127


def load_video_masks(ds: Dataset, image_size: int, crop_size: int) -> np.ndarray:
    """Ground truth (N, crop, crop) bool in test order, with the geometry of the preprocessed frames.

    PNG masks go through :func:`~spade_ad.data.read_mask`; ``.npy`` masks are ``> 0`` then resized
    (nearest) and centre-cropped the same way. Frames without a mask get all-False masks. Plain
    :class:`~spade_ad.data.TestItem` entries with a ``mask`` are read with read_mask as well.
    """
    out = np.zeros((len(ds.test), crop_size, crop_size), dtype=bool)
    arrays: dict[Path, np.ndarray] = {}
    for i, t in enumerate(ds.test):
        if isinstance(t, VideoFrame) and t.mask_array is not None:
            npy = t.mask_array
            if npy not in arrays:  # memory-mapped once per video, read one frame at a time
                arrays[npy] = _open_npy(npy)
            out[i] = _binary_to_crop(np.asarray(arrays[npy][t.index]) > 0, image_size, crop_size)
            continue
        png = t.mask_file if isinstance(t, VideoFrame) and t.mask_file is not None else t.mask
        if png is not None:
            out[i] = read_mask(png, image_size, crop_size)
    return out
