"""Reading images and masks safely, dataset layouts, and the paper's preprocessing.

Every image, whatever its mode (grey, RGB, RGBA, palette, 16-bit) and size, becomes an RGB float
array in [0, 1], resized to ``image_size`` x ``image_size`` and centre-cropped to ``crop_size``, as in
the paper (Resize(256) then CenterCrop(224)). Masks go through the same geometry with nearest
interpolation so that they stay aligned with the anomaly maps pixel for pixel.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DatasetError, ImageError, ImageTooLargeError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

#: Images with more pixels than this are refused before decoding (decompression bombs). 64 Mpx is
#: far above any inspection camera we know of, and a quarter of what a bomb needs to exhaust memory.
DEFAULT_MAX_PIXELS = 64_000_000

#: One image given to fit/predict/extract: a file path, or an array already in memory.
ImageLike = str | os.PathLike | np.ndarray


# --------------------------------------------------------------------------------------------
# Reading one image
# --------------------------------------------------------------------------------------------
# Pillow's own bomb limit is a process-wide global; we replace it by our per-call ``max_pixels``
# check. The lock makes the swap safe between our loader threads, and is held only while Pillow
# reads the header (decoding happens outside it, in parallel).
_OPEN_LOCK = threading.Lock()


def _open_header(source: Path | io.BytesIO, formats: Sequence[str] | None = None) -> Image.Image:
    """``Image.open`` (header only) with Pillow's global pixel limit lifted; our caller checks size."""
    with _OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(source, formats=None if formats is None else list(formats))
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open_source(
    source: Path | io.BytesIO, name: str, max_pixels: int, formats: Sequence[str] | None = None
) -> Image.Image:
    """Open a file or in-memory bytes, refusing non-images, bombs and truncated data; ``name`` is for messages."""
    try:
        img = _open_header(source, formats)
    except UnidentifiedImageError:
        allowed = "" if formats is None else f"; accepted: {', '.join(formats)}"
        raise ImageError(f"{name}: not an image (unrecognised or unsupported format{allowed})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: cannot be opened ({exc})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: has an empty size {w}x{h}")
    if w * h > max_pixels:
        img.close()
        raise ImageTooLargeError(
            f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(possible decompression bomb; raise max_pixels if the image is genuine)"
        )
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        img.close()
        raise ImageError(f"{name}: truncated or corrupt image data ({exc})") from None
    return img


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """Open ``path`` with Pillow, refusing missing files, non-images, bombs and truncated data."""
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a regular file")
    return _open_source(path, str(path), max_pixels)


def _to_float_rgb(img: Image.Image, name: str) -> np.ndarray:
    """Any Pillow image -> float32 (H, W, 3) in [0, 1], keeping 16-bit precision."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float32)
        # 16-bit data (PNG 16-bit grey opens as I;16 or I): full scale is 65535.
        arr = arr / 65535.0
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageError(f"{name}: integer image values outside the 16-bit range")
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageError(f"{name}: floating-point image must hold finite values in [0, 1]")
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    # RGBA/LA: the alpha channel is dropped (not composited), as torchvision's loaders do.
    rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.float32) / 255.0


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as float32 RGB (H, W, 3) in [0, 1]; raise :class:`ImageError` on any problem."""
    p = Path(path)
    img = _open_checked(p, max_pixels)
    try:
        return _to_float_rgb(img, str(p))
    finally:
        img.close()


def read_image_bytes(
    data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, formats: Sequence[str] | None = None
) -> np.ndarray:
    """Decode an encoded image held in memory (e.g. an upload) exactly as :func:`read_image` reads a file.

    Same checks and same result as ``read_image`` on a file with these bytes: the pixel count is
    checked from the header before any decoding (:class:`ImageTooLargeError`), then undecodable or
    truncated data raises :class:`ImageError`. ``name`` only labels messages; it is never opened.
    ``formats``: Pillow format names to accept (e.g. ``("PNG", "JPEG")``); None accepts all.
    """
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    img = _open_source(io.BytesIO(data), name, max_pixels, formats)
    try:
        return _to_float_rgb(img, name)
    finally:
        img.close()


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file, reading only its header."""
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such file")
    try:
        with _open_header(p) as img:
            return img.size
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image (unrecognised or unsupported format)") from None
    except OSError as exc:
        raise ImageError(f"{p}: cannot be opened ({exc})") from None


def array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    """An in-memory image (H, W), (H, W, 1|3|4), uint8/uint16 or float in [0, 1] -> float32 RGB."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        a = a[:, :, :3] if a.shape[2] != 1 else np.repeat(a, 3, axis=2)
    elif a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    else:
        raise ImageError(f"{name}: array of shape {a.shape} is not an image (H, W[, 1|3|4])")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
        # NaN passes through on purpose: the feature check names the image it came from.
        finite = a[np.isfinite(a)]
        if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
            raise ImageError(f"{name}: float image values must lie in [0, 1]")
        return a
    raise ImageError(f"{name}: unsupported array dtype {a.dtype}")


# --------------------------------------------------------------------------------------------
# Geometry: resize + centre crop (images bilinear, masks nearest)
# --------------------------------------------------------------------------------------------
def crop_box(image_size: int, crop_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre crop, rounded as torchvision's CenterCrop."""
    off = int(round((image_size - crop_size) / 2.0))
    return off, off, off + crop_size, off + crop_size


#: ``squash``: resize to image_size x image_size whatever the aspect ratio (the paper). ``pad``: resize
#: so the long side is image_size, keep the aspect ratio, and pad the short side symmetrically to a
#: square with the image's mean colour; pixel metrics then count only the image's own area.
GEOMETRIES = ("squash", "pad")


def placed_box(height: int, width: int, image_size: int, geometry: str) -> tuple[int, int, int, int]:
    """(top, left, resized height, resized width) of the image inside the image_size square."""
    if geometry == "squash":
        return 0, 0, image_size, image_size
    if geometry != "pad":
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    scale = image_size / max(height, width)
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    return (image_size - nh) // 2, (image_size - nw) // 2, nh, nw


def valid_region(height: int, width: int, image_size: int, crop_size: int, geometry: str) -> np.ndarray:
    """bool (crop, crop): where the preprocessed picture shows the image (not padding)."""
    top, left, nh, nw = placed_box(height, width, image_size, geometry)
    full = np.zeros((image_size, image_size), dtype=bool)
    full[top : top + nh, left : left + nw] = True
    c_left, c_top, c_right, c_bottom = crop_box(image_size, crop_size)
    return full[c_top:c_bottom, c_left:c_right]


def _resize_float_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of float RGB to (width, height), one Pillow 'F' plane per channel."""
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(rgb[:, :, c])).resize(size, Image.Resampling.BILINEAR))
        for c in range(3)
    ]
    return np.stack(planes, axis=2)


def preprocess(rgb: np.ndarray, image_size: int, crop_size: int, geometry: str = "squash") -> np.ndarray:
    """Float RGB (H, W, 3) in [0, 1] -> float32 (3, crop, crop): resize (see :data:`GEOMETRIES`),
    then centre crop.

    8-bit content goes through Pillow's 8-bit bilinear resize (what torchvision does on PIL images);
    anything finer (16-bit, float arrays) is resized in float so no precision is thrown away.
    """
    top, left, nh, nw = placed_box(rgb.shape[0], rgb.shape[1], image_size, geometry)
    as8 = np.round(rgb * 255.0)
    if np.isfinite(rgb).all() and np.allclose(as8 / 255.0, rgb, atol=1e-6):
        img = Image.fromarray(as8.astype(np.uint8), "RGB").resize((nw, nh), Image.Resampling.BILINEAR)
        placed = np.asarray(img, dtype=np.float32) / 255.0
    else:
        placed = _resize_float_rgb(rgb, (nw, nh))
    if (nh, nw) == (image_size, image_size):
        out = placed
    else:
        # Padding with the image's mean colour: a flat area that looks the same in normal and test
        # images, so it neither matches nor mismatches anything in particular.
        out = np.empty((image_size, image_size, 3), dtype=np.float32)
        out[:] = placed.reshape(-1, 3).mean(axis=0)
        out[top : top + nh, left : left + nw] = placed
    left, top, right, bottom = crop_box(image_size, crop_size)
    out = out[top:bottom, left:right]
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def read_mask(
    path: str | os.PathLike,
    image_size: int,
    crop_size: int,
    expected_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    geometry: str = "squash",
) -> np.ndarray:
    """Read a ground-truth mask as bool (crop, crop), with the same geometry as its image (padding is
    defect-free).

    ``expected_size`` is the (width, height) of the image the mask belongs to; a mask of another size
    is an error, not something to resize silently. A pixel is defective where the mask is above half
    its full scale (MVTec masks are 0/255).
    """
    p = Path(path)
    img = _open_checked(p, max_pixels)
    try:
        if expected_size is not None and img.size != tuple(expected_size):
            raise ImageError(
                f"{p}: mask is {img.size[0]}x{img.size[1]} but its image is {expected_size[0]}x{expected_size[1]}"
            )
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            binary = np.asarray(img) > 32767
        else:
            binary = np.asarray(img.convert("L")) > 127
    finally:
        img.close()
    top, left, nh, nw = placed_box(binary.shape[0], binary.shape[1], image_size, geometry)
    m = Image.fromarray(binary.astype(np.uint8) * 255, "L").resize((nw, nh), Image.Resampling.NEAREST)
    full = np.zeros((image_size, image_size), dtype=bool)
    full[top : top + nh, left : left + nw] = np.asarray(m) > 127
    c_left, c_top, c_right, c_bottom = crop_box(image_size, crop_size)
    return full[c_top:c_bottom, c_left:c_right]


def load_preprocessed(
    item: ImageLike, name: str, image_size: int, crop_size: int, max_pixels: int, geometry: str = "squash"
) -> np.ndarray:
    """Read (if a path) and preprocess one image -> float32 (3, crop, crop)."""
    rgb = array_to_rgb(item, name) if isinstance(item, np.ndarray) else read_image(item, max_pixels=max_pixels)
    return preprocess(rgb, image_size, crop_size, geometry)


def item_size(item: ImageLike, name: str) -> tuple[int, int]:
    """(height, width) of a path (from its header only) or an array."""
    if isinstance(item, np.ndarray):
        return int(item.shape[0]), int(item.shape[1])
    w, h = image_size_of(item)
    return h, w


# --------------------------------------------------------------------------------------------
# Collections of images
# --------------------------------------------------------------------------------------------
def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files (by extension) inside ``folder``, sorted; error if there are none.

    ``recursive``: also walk sub-folders (hidden files and folders are skipped), sorted by relative path.
    """
    d = Path(folder)
    if not d.exists():
        raise DatasetError(f"{d}: no such folder")
    if not d.is_dir():
        raise DatasetError(f"{d}: not a folder")
    candidates = d.rglob("*") if recursive else d.iterdir()
    files = sorted(
        p
        for p in candidates
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(d).parts)
    )
    if not files:
        where = " or its sub-folders" if recursive else ""
        raise DatasetError(f"{d}: folder{where} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def expand_inputs(inputs: Iterable[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Files and folders (as given on a command line) -> image paths; folders are listed (and their
    sub-folders walked when ``recursive``), files kept."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(list_images(p, recursive=recursive))
        elif p.exists():
            out.append(p)
        else:
            raise ImageError(f"{p}: no such file or folder")
    if not out:
        raise DatasetError("no input images given")
    return out


def as_image_list(images: object) -> tuple[list[ImageLike], list[str]]:
    """Normalise what users pass to fit/predict/extract into (items, names).

    Accepts a folder, a single path, a list of paths and/or arrays, an array batch (N, H, W[, C]),
    or one colour image array (H, W, 3|4). Names are the paths as strings, or ``array[i]`` for in-memory images.
    """
    if isinstance(images, (str, os.PathLike)):
        p = Path(images)
        items: list[ImageLike] = list(list_images(p)) if p.is_dir() else [p]
    elif isinstance(images, np.ndarray):
        if images.ndim == 3 and images.shape[2] in (3, 4):
            # One colour image (H, W, 3|4), not a batch of H grey images 3 or 4 pixels wide.
            items = [images]
        elif images.ndim in (3, 4):
            items = [images[i] for i in range(images.shape[0])]
        else:
            raise ImageError(f"array of shape {images.shape}: expected one image (H, W, 3|4) or a batch (N, H, W[, C])")
    elif isinstance(images, Sequence) or hasattr(images, "__iter__"):
        items = []
        for x in images:
            if isinstance(x, np.ndarray):
                items.append(x)
            elif isinstance(x, (str, os.PathLike)):
                p = Path(x)
                items.extend(list_images(p) if p.is_dir() else [p])
            else:
                raise ImageError(f"cannot use {type(x).__name__} as an image: pass paths or numpy arrays")
    else:
        raise ImageError(f"cannot use {type(images).__name__} as images: pass a folder, paths or an array")
    if not items:
        raise DatasetError("no images given")
    names = [str(x) if not isinstance(x, np.ndarray) else f"array[{i}]" for i, x in enumerate(items)]
    return items, names


# --------------------------------------------------------------------------------------------
# Dataset layouts for evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class TestItem:
    """One test image: its path, label (0 normal, 1 anomalous), defect type and mask (if any)."""

    path: Path
    label: int
    defect: str
    mask: Path | None = None


@dataclass
class Dataset:
    """Training (normal) images and labelled test images of one category."""

    name: str
    train: list[Path]
    test: list[TestItem] = field(default_factory=list)


def _mask_stem(mask: Path) -> str:
    stem = mask.stem
    return stem.removesuffix("_mask")


def _attach_masks(items: list[TestItem], mask_dir: Path | None, where: str, required: bool) -> None:
    """Match masks to anomalous test images by file stem; refuse masks that have no image."""
    if mask_dir is None or not mask_dir.is_dir():
        if required and any(t.label == 1 for t in items):
            raise DatasetError(f"{where}: no ground-truth folder {mask_dir} for the defective images")
        return
    masks = {}
    for m in sorted(mask_dir.iterdir()):
        if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS:
            masks[_mask_stem(m)] = m
    by_stem = {t.path.stem: t for t in items}
    for stem, m in masks.items():
        if stem not in by_stem:
            raise DatasetError(f"{m}: mask has no matching test image (expected {stem}.* in {where})")
        by_stem[stem].mask = m
    if required:
        for t in items:
            if t.label == 1 and t.mask is None:
                raise DatasetError(f"{t.path}: defective test image has no mask in {mask_dir}")


def load_mvtec(root: str | os.PathLike, category: str) -> Dataset:
    """An MVTec-AD-layout category: ``train/good``, ``test/<defect>``, ``ground_truth/<defect>``.

    Checks the whole layout up front (images listed, masks matched by stem, mask and image sizes
    equal) so that a broken dataset fails in a second, not after an hour of feature extraction.
    A category with no ``ground_truth`` folder at all is an image-level dataset: it loads without
    masks (pixel metrics are then not defined); once the folder exists, every defect type needs its masks.
    """
    base = Path(root) / category
    if not base.is_dir():
        raise DatasetError(f"{base}: no such category folder")
    train = list_images(base / "train" / "good")
    test_dir = base / "test"
    gt_dir = base / "ground_truth"
    pixel_level = gt_dir.is_dir()
    if not test_dir.is_dir():
        raise DatasetError(f"{test_dir}: no test folder")
    test: list[TestItem] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        label = 0 if defect == "good" else 1
        items = [TestItem(p, label, defect) for p in list_images(defect_dir)]
        if label and pixel_level:
            _attach_masks(items, gt_dir / defect, str(defect_dir), required=True)
        test.extend(items)
    if not test:
        raise DatasetError(f"{test_dir}: no test images")
    if pixel_level:
        for d in gt_dir.iterdir():
            if d.is_dir() and not (test_dir / d.name).is_dir():
                raise DatasetError(f"{d}: masks for defect type {d.name!r} but no folder {test_dir / d.name}")
    check_mask_sizes(test)
    return Dataset(name=category, train=train, test=test)


def load_folders(
    train: str | os.PathLike,
    good: Sequence[str | os.PathLike] = (),
    anomalous: Sequence[str | os.PathLike] = (),
    masks: str | os.PathLike | None = None,
    name: str = "folders",
) -> Dataset:
    """Plain folders: a folder of normal training images, folders of normal and of anomalous test
    images, and optionally one folder of masks matched to anomalous images by file stem
    (``x.png`` <- ``x.png`` or ``x_mask.png``). Anomalous images without a mask count as all-defect-free
    for the pixel metrics only if no masks folder is given; with one, each needs its mask."""
    test: list[TestItem] = []
    for folder in good:
        test.extend(TestItem(p, 0, "good") for p in list_images(folder))
    bad: list[TestItem] = []
    for folder in anomalous:
        bad.extend(TestItem(p, 1, Path(folder).name) for p in list_images(folder))
    if masks is not None:
        stems = [t.path.stem for t in bad]
        dup = sorted({x for x in stems if stems.count(x) > 1})
        if dup:
            where = [str(t.path) for t in bad if t.path.stem == dup[0]]
            raise DatasetError(
                f"{where[0]} and {where[1]}: anomalous images share the stem {dup[0]!r}, "
                "so masks cannot be matched by file name"
            )
        mdir = Path(masks)
        if not mdir.is_dir():
            raise DatasetError(f"{mdir}: no such masks folder")
        _attach_masks(bad, mdir, ", ".join(str(a) for a in anomalous), required=True)
    test.extend(bad)
    ds = Dataset(name=name, train=list_images(train), test=test)
    check_mask_sizes(ds.test)
    return ds


def load_labelled(folder: str | os.PathLike, name: str | None = None) -> Dataset:
    """A labelled folder (e.g. a validation set): ``folder/good/*`` normal, ``folder/<defect>/*``
    anomalous, optional masks in ``folder/ground_truth/<defect>/<stem>[_mask].png``.

    Returned as a :class:`Dataset` with no training images and the labelled images as ``test``.
    """
    base = Path(folder)
    if not base.is_dir():
        raise DatasetError(f"{base}: no such folder")
    items: list[TestItem] = []
    for sub in sorted(p for p in base.iterdir() if p.is_dir() and p.name != "ground_truth"):
        label = 0 if sub.name == "good" else 1
        group = [TestItem(p, label, sub.name) for p in list_images(sub)]
        if label:
            _attach_masks(group, base / "ground_truth" / sub.name, str(sub), required=False)
        items.extend(group)
    if not items:
        raise DatasetError(f"{base}: no labelled sub-folders (good/, <defect>/)")
    check_mask_sizes(items)
    return Dataset(name=name or base.name, train=[], test=items)


def check_mask_sizes(items: Iterable[TestItem]) -> None:
    """Every mask must have exactly its image's size (headers only; cheap)."""
    for t in items:
        if t.mask is not None:
            isz, msz = image_size_of(t.path), image_size_of(t.mask)
            if isz != msz:
                raise ImageError(
                    f"{t.mask}: mask is {msz[0]}x{msz[1]} but its image {t.path.name} is {isz[0]}x{isz[1]}"
                )
