"""The data module: reading every image mode, the paper's geometry, masks, dataset layouts,
the inputs fit/predict accept, and output names."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATASETS, require_dataset  # tests/ is on sys.path (pytest rootdir conftest)
from PIL import Image

from spade_ad import SPADE, DatasetError, ImageError, SpadeError
from spade_ad.data import (
    as_image_list,
    crop_box,
    load_folders,
    load_mvtec,
    load_preprocessed,
    preprocess,
    read_image,
    read_mask,
)
from spade_ad.features import Preprocessing, iter_batches
from spade_ad.output import unique_stems


def rgb_u8(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# reading every image mode
# --------------------------------------------------------------------------------------------
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255], [10, 20, 30]], dtype=np.uint8)


def _palette_image(idx: np.ndarray) -> Image.Image:
    im = Image.fromarray(idx.astype(np.uint8), "P")
    im.putpalette(PALETTE.ravel().tolist())
    return im


def make_mode(mode: str, path: Path) -> np.ndarray:
    """Write a 7 (wide) x 5 (high) image of ``mode`` to ``path``; return the float RGB it must read as."""
    w, h = 7, 5
    rng = np.random.default_rng(1)
    if mode == "L":
        a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        Image.fromarray(a, "L").save(path)
        return np.repeat(a[:, :, None], 3, axis=2) / 255.0
    if mode == "LA":
        a = rng.integers(0, 256, (h, w, 2), dtype=np.uint8)
        Image.fromarray(a, "LA").save(path)
        return np.repeat(a[:, :, :1], 3, axis=2) / 255.0
    if mode == "RGB":
        a = rgb_u8(w, h)
        Image.fromarray(a).save(path)
        return a / 255.0
    if mode == "RGBA":
        a = rgb_u8(w, h)
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        alpha[0, 0] = 0  # fully transparent pixels keep their colour: alpha is dropped, not composited
        Image.fromarray(np.concatenate([a, alpha], axis=2), "RGBA").save(path)
        return a / 255.0
    if mode in ("P", "P_transparent_index", "P_trns_bytes"):
        idx = rng.integers(0, 4, (h, w))
        im = _palette_image(idx)
        if mode == "P":
            im.save(path)
        elif mode == "P_transparent_index":
            im.save(path, transparency=1)
        else:
            im.save(path, transparency=bytes([255, 0, 128, 255]))
        return PALETTE[idx] / 255.0
    if mode == "1":
        b = rng.random((h, w)) > 0.5
        Image.fromarray(b).save(path)
        return np.repeat(b[:, :, None], 3, axis=2).astype(np.float64)
    if mode == "I;16":
        a = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        a[0, 0] = 257 * 100 + 3
        Image.fromarray(a).save(path)
        return np.repeat(a[:, :, None], 3, axis=2) / 65535.0
    if mode == "F":
        a = rng.random((h, w)).astype(np.float32)
        Image.fromarray(a, "F").save(path)  # TIFF
        return np.repeat(a[:, :, None], 3, axis=2)
    raise AssertionError(mode)


@pytest.mark.parametrize(
    "mode, ext, opened_as",
    [
        ("L", "png", "L"),
        ("LA", "png", "LA"),
        ("RGB", "png", "RGB"),
        ("RGBA", "png", "RGBA"),
        ("P", "png", "P"),
        ("P_transparent_index", "png", "P"),
        ("P_trns_bytes", "png", "P"),
        ("1", "png", "1"),
        ("I;16", "png", None),
        ("F", "tif", "F"),
        ("RGB", "bmp", "RGB"),
    ],
)
def test_every_mode_reads_as_float_rgb(tmp_path, mode, ext, opened_as):
    path = tmp_path / f"img.{ext}"
    expected = make_mode(mode, path)
    if opened_as is not None:
        with Image.open(path) as im:
            assert im.mode == opened_as  # the case under test really is that mode on disk
    out = read_image(path)
    assert out.dtype == np.float32 and out.shape == (5, 7, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)


def test_16bit_precision_is_kept(tmp_path):
    v = 257 * 100 + 3  # between two 8-bit levels: 8-bit reading would give 100/255
    Image.fromarray(np.full((40, 40), v, dtype=np.uint16)).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert abs(float(out[0, 0, 0]) - v / 65535) < 1e-6
    assert abs(v / 65535 - 100 / 255) > 4e-5  # so the check above can tell the two apart
    # and preprocessing (resize + crop) keeps it too
    pre = preprocess(out, 32, 24)
    assert pre.shape == (3, 24, 24)
    np.testing.assert_allclose(pre, v / 65535, atol=1e-6, rtol=0)


def test_jpeg_reads_as_decoded_rgb(tmp_path):
    a = np.zeros((16, 24, 3), dtype=np.uint8)
    a[:] = (200, 100, 50)
    Image.fromarray(a).save(tmp_path / "x.jpg", quality=95)
    out = read_image(tmp_path / "x.jpg")
    assert out.shape == (16, 24, 3) and out.dtype == np.float32
    with Image.open(tmp_path / "x.jpg") as im:
        np.testing.assert_array_equal(out, np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), np.array([200, 100, 50]) / 255.0, atol=3 / 255)


def test_greyscale_jpeg_reads_as_rgb(tmp_path):
    g = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (8, 1))
    Image.fromarray(g, "L").save(tmp_path / "g.jpg", quality=100)
    out = read_image(tmp_path / "g.jpg")
    assert out.shape == (8, 32, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    np.testing.assert_allclose(out[..., 0], g / 255.0, atol=4 / 255)


def test_float_tiff_out_of_range_is_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 2.0, dtype=np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(ImageError) as exc:
        read_image(tmp_path / "f.tif")
    assert str(tmp_path / "f.tif") in str(exc.value) and "[0, 1]" in str(exc.value)


def test_mixed_modes_and_sizes_in_one_fit(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    Image.fromarray(rgb_u8(48, 48, 1)).save(d / "a_rgb.png")
    Image.fromarray(rgb_u8(60, 40, 2)[:, :, 0], "L").save(d / "b_grey_wide.png")
    rgba = np.concatenate([rgb_u8(33, 71, 3), np.full((71, 33, 1), 90, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(d / "c_rgba_tall.png")
    Image.fromarray(np.random.default_rng(4).integers(0, 65536, (30, 50), dtype=np.uint16)).save(d / "d_16bit.png")
    Image.fromarray(rgb_u8(64, 48, 5)).save(d / "e_photo.jpg")
    _palette_image(np.random.default_rng(6).integers(0, 4, (40, 40))).save(d / "f_palette.png")
    files = sorted(d.iterdir())

    model = SPADE(image_size=32, crop_size=32, k=2).fit(d)
    assert model.train_paths_ == [str(p) for p in files]
    pred = model.predict(d)
    assert pred.names == [str(p) for p in files]
    assert pred.anomaly_maps.shape == (6, 32, 32) and pred.anomaly_maps.dtype == np.float32
    assert np.isfinite(pred.anomaly_maps).all() and np.isfinite(pred.image_scores).all()
    assert pred.neighbors.shape == (6, 2)
    # Every training image's nearest training image is itself, at distance ~0.
    assert pred.neighbors[:, 0].tolist() == list(range(6))
    g, _ = model.extract(d)
    d2 = ((g[:, None].double() - g[None].double()) ** 2).sum(-1)
    d2.fill_diagonal_(float("inf"))
    np.testing.assert_allclose(pred.image_scores, d2.min(dim=1).values.numpy() / 2, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# geometry: resize to a square, then centre crop
# --------------------------------------------------------------------------------------------
def test_crop_box():
    assert crop_box(256, 224) == (16, 16, 240, 240)
    assert crop_box(32, 32) == (0, 0, 32, 32)
    assert crop_box(64, 48) == (8, 8, 56, 56)


def test_preprocess_crops_without_resizing_when_sizes_match():
    img = np.zeros((64, 64, 3), dtype=np.float32)
    img[:, 32:] = 1.0  # left half 0, right half 1
    out = preprocess(img, 64, 48)  # no resize; crop offset 8
    expected = np.zeros((3, 48, 48), dtype=np.float32)
    expected[:, :, 24:] = 1.0  # the edge stays in the middle
    np.testing.assert_array_equal(out, expected)


def test_preprocess_non_square_edge_stays_in_the_middle():
    img = np.zeros((64, 128, 3), dtype=np.float32)  # 128 wide, 64 high
    img[:, 64:] = 1.0
    out = preprocess(img, 64, 48)
    assert out.shape == (3, 48, 48) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.broadcast_to(out[:, :1, :], out.shape))  # rows identical
    row = out[0, 0]
    assert (row[:23] == 0).all() and (row[25:] == 1).all()
    assert row[23] + row[24] == pytest.approx(1.0, abs=2 / 255)  # symmetric around the edge


def marker_image(size: int, top: int, left: int, side: int) -> np.ndarray:
    img = np.zeros((size, size, 3), dtype=np.float32)
    img[top : top + side, left : left + side] = 1.0
    return img


def test_preprocess_marker_lands_at_position_minus_crop_offset():
    out = preprocess(marker_image(256, 100, 150, 10), 256, 224)
    expected = np.zeros((3, 224, 224), dtype=np.float32)
    expected[:, 84:94, 134:144] = 1.0  # (100, 150) - 16
    np.testing.assert_array_equal(out, expected)


def test_preprocess_marker_after_downscaling():
    out = preprocess(marker_image(512, 200, 300, 20), 256, 224)[0]
    ys, xs = np.mgrid[0:224, 0:224]
    cy, cx = (out * ys).sum() / out.sum(), (out * xs).sum() / out.sum()
    # Rows 200..219 / columns 300..319 halve to 100..109 / 150..159, centre (104.5, 154.5); the blur of
    # the bilinear resize is symmetric so the centre of mass stays; minus the crop offset 16.
    assert cy == pytest.approx(88.5, abs=0.01) and cx == pytest.approx(138.5, abs=0.01)
    assert out[90, 140] == 1.0 and out[70, 140] == 0.0 and out[90, 120] == 0.0


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
def test_read_mask_binarises_above_127(tmp_path):
    m = np.zeros((8, 8), dtype=np.uint8)
    m[:, 2] = 127
    m[:, 3] = 128
    m[:, 4] = 255
    m[:, 5] = 1
    Image.fromarray(m).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png", 8, 8)
    assert out.dtype == bool and out.shape == (8, 8)
    expected = np.zeros((8, 8), dtype=bool)
    expected[:, 3:5] = True
    np.testing.assert_array_equal(out, expected)


def test_read_mask_16bit_binarises_at_half_scale(tmp_path):
    m = np.zeros((4, 4), dtype=np.uint16)
    m[0] = 32767
    m[1] = 32768
    m[2] = 65535
    Image.fromarray(m).save(tmp_path / "m16.png")
    out = read_mask(tmp_path / "m16.png", 4, 4)
    np.testing.assert_array_equal(out, np.array([[False] * 4, [True] * 4, [True] * 4, [False] * 4]))


@pytest.mark.parametrize("size, top, left, side", [(256, 100, 150, 10), (512, 200, 300, 20)])
def test_mask_follows_the_image_geometry(tmp_path, size, top, left, side):
    img = marker_image(size, top, left, side)
    Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "img.png")
    Image.fromarray((img[:, :, 0] * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    image = load_preprocessed(tmp_path / "img.png", "img", 256, 224, 10**9)[0]
    mask = read_mask(tmp_path / "mask.png", 256, 224, expected_size=(size, size))
    assert mask.shape == (224, 224) and mask.sum() == 100
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (84, 93, 134, 143)
    np.testing.assert_array_equal(mask, image > 0.5)


def test_non_square_mask_follows_the_image_geometry(tmp_path):
    img = np.zeros((64, 128), dtype=np.uint8)  # 128 wide, 64 high
    img[20:40, 80:100] = 255
    Image.fromarray(img).save(tmp_path / "img.png")
    Image.fromarray(img).save(tmp_path / "mask.png")
    image = load_preprocessed(tmp_path / "img.png", "img", 64, 48, 10**9)[0]
    mask = read_mask(tmp_path / "mask.png", 64, 48, expected_size=(128, 64))
    np.testing.assert_array_equal(mask, image > 0.5)
    ys, xs = np.nonzero(mask)
    # rows 20..39 stay (x1 vertically), columns 80..99 halve to 40..49; minus the crop offset 8
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (12, 31, 32, 41)


def test_read_mask_refuses_other_size(tmp_path):
    Image.fromarray(np.zeros((30, 40), dtype=np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ImageError) as exc:
        read_mask(tmp_path / "m.png", 32, 32, expected_size=(48, 48))
    assert str(tmp_path / "m.png") in str(exc.value) and "40x30" in str(exc.value) and "48x48" in str(exc.value)


# --------------------------------------------------------------------------------------------
# dataset layouts
# --------------------------------------------------------------------------------------------
def test_load_mvtec_transistor():
    root = require_dataset(DATASETS / "mvtec_ad")
    ds = load_mvtec(root, "transistor")
    base = root / "transistor"
    assert ds.name == "transistor"
    assert len(ds.train) == 213 and len(ds.test) == 100
    assert all(p.parent == base / "train" / "good" for p in ds.train) and ds.train == sorted(ds.train)
    counts: dict[str, int] = {}
    for t in ds.test:
        counts[t.defect] = counts.get(t.defect, 0) + 1
        assert t.path.parent == base / "test" / t.defect
        assert t.label == (0 if t.defect == "good" else 1)
        if t.label:
            assert t.mask == base / "ground_truth" / t.defect / f"{t.path.stem}_mask.png"
        else:
            assert t.mask is None
    assert counts == {"good": 60, "bent_lead": 10, "cut_lead": 10, "damaged_case": 10, "misplaced": 10}
    assert sum(t.mask is not None for t in ds.test) == 40


def test_load_mvtec_magnetic_tile():
    require_dataset(DATASETS / "magnetic_tile")
    ds = load_mvtec(DATASETS, "magnetic_tile")
    assert len(ds.train) == 762
    counts: dict[str, int] = {}
    for t in ds.test:
        counts[t.defect] = counts.get(t.defect, 0) + 1
        assert t.label == (0 if t.defect == "good" else 1)
        assert (t.mask is not None) == bool(t.label)
        if t.mask is not None:
            assert t.mask.parent.name == t.defect and t.mask.stem in (t.path.stem, f"{t.path.stem}_mask")
    assert counts == {"good": 190, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}
    assert len(ds.test) == 582


def test_load_folders_matches_masks_by_stem(tmp_path):
    def save(p: Path, seed: int, size=(20, 16)) -> Path:
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb_u8(*size, seed)).save(p)
        return p

    for i in range(3):
        save(tmp_path / "train" / f"t{i}.png", i)
    save(tmp_path / "good" / "g0.png", 10)
    x = save(tmp_path / "bad" / "x.png", 11)
    y = save(tmp_path / "bad" / "y.png", 12)
    mx = tmp_path / "masks" / "x_mask.png"
    my = tmp_path / "masks" / "y.png"
    for m in (mx, my):
        m.parent.mkdir(exist_ok=True)
        Image.fromarray(np.zeros((16, 20), np.uint8)).save(m)

    ds = load_folders(
        tmp_path / "train",
        good=[tmp_path / "good"],
        anomalous=[tmp_path / "bad"],
        masks=tmp_path / "masks",
        name="mine",
    )
    assert ds.name == "mine"
    assert [p.name for p in ds.train] == ["t0.png", "t1.png", "t2.png"]
    assert [(t.path, t.label, t.defect, t.mask) for t in ds.test] == [
        (tmp_path / "good" / "g0.png", 0, "good", None),
        (x, 1, "bad", mx),
        (y, 1, "bad", my),
    ]

    # without a masks folder, anomalous images need no masks
    ds2 = load_folders(tmp_path / "train", anomalous=[tmp_path / "bad"])
    assert [(t.label, t.mask) for t in ds2.test] == [(1, None), (1, None)]

    # a mask without an image, a defective image without a mask, a mask of the wrong size
    orphan = tmp_path / "masks" / "z_mask.png"
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(orphan)
    with pytest.raises(DatasetError, match=r"z_mask\.png: mask has no matching test image"):
        load_folders(tmp_path / "train", anomalous=[tmp_path / "bad"], masks=tmp_path / "masks")
    orphan.unlink()
    my.unlink()
    with pytest.raises(DatasetError) as exc:
        load_folders(tmp_path / "train", anomalous=[tmp_path / "bad"], masks=tmp_path / "masks")
    assert str(y) in str(exc.value) and "no mask" in str(exc.value)
    Image.fromarray(np.zeros((20, 16), np.uint8)).save(my)  # transposed size
    with pytest.raises(ImageError) as exc:
        load_folders(tmp_path / "train", anomalous=[tmp_path / "bad"], masks=tmp_path / "masks")
    assert str(my) in str(exc.value) and "16x20" in str(exc.value)
    with pytest.raises(DatasetError, match="no such masks folder"):
        load_folders(tmp_path / "train", anomalous=[tmp_path / "bad"], masks=tmp_path / "nope")


# --------------------------------------------------------------------------------------------
# as_image_list: what fit/predict/extract accept
# --------------------------------------------------------------------------------------------
def test_as_image_list_folder_and_paths(tmp_path):
    for name in ("b.png", "a.jpg", "c.txt", ".hidden.png", "D.PNG"):
        (tmp_path / name).write_bytes(b"")
    items, names = as_image_list(tmp_path)
    assert items == [tmp_path / "D.PNG", tmp_path / "a.jpg", tmp_path / "b.png"]
    assert names == [str(p) for p in items]
    items, names = as_image_list(str(tmp_path))
    assert names == [str(tmp_path / "D.PNG"), str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]

    items, names = as_image_list([str(tmp_path / "b.png"), tmp_path / "a.jpg"])  # order kept
    assert items == [tmp_path / "b.png", tmp_path / "a.jpg"]
    assert names == [str(tmp_path / "b.png"), str(tmp_path / "a.jpg")]
    items, names = as_image_list(tmp_path / "b.png")  # one path
    assert names == [str(tmp_path / "b.png")]


def test_as_image_list_array_batches():
    grey = np.zeros((4, 10, 12), dtype=np.uint8)
    items, names = as_image_list(grey)
    assert len(items) == 4 and all(x.shape == (10, 12) for x in items)
    assert names == ["array[0]", "array[1]", "array[2]", "array[3]"]
    rgb = np.zeros((2, 10, 12, 3), dtype=np.float32)
    rgb[1] = 0.5
    items, names = as_image_list(rgb)
    assert [x.shape for x in items] == [(10, 12, 3), (10, 12, 3)] and names == ["array[0]", "array[1]"]
    assert items[1].max() == 0.5 and items[0].max() == 0.0


def test_as_image_list_mixed_list(tmp_path):
    p = tmp_path / "x.png"
    Image.fromarray(rgb_u8(12, 10)).save(p)
    arr = rgb_u8(12, 10, 1)
    items, names = as_image_list([p, arr, str(p)])
    assert names == [str(p), "array[1]", str(p)]
    assert items[1] is arr
    # a folder inside a list is expanded in place
    items, names = as_image_list([arr, tmp_path])
    assert names == ["array[0]", str(p)]


@pytest.mark.parametrize(
    "bad, error, phrase",
    [
        ([], DatasetError, "no images"),
        (np.zeros((10, 12)), ImageError, "or a batch (N, H, W"),
        (np.zeros((1, 2, 10, 12, 3)), ImageError, "or a batch (N, H, W"),
        ([3], ImageError, "cannot use int"),
        (42, ImageError, "cannot use int"),
    ],
)
def test_as_image_list_refuses(bad, error, phrase):
    with pytest.raises(error) as exc:
        as_image_list(bad)
    assert phrase in str(exc.value)


def test_uint8_uint16_and_float_arrays_preprocess_alike():
    u8 = rgb_u8(50, 40, 7)
    a = load_preprocessed(u8, "u8", 32, 24, 10**9)
    b = load_preprocessed(u8.astype(np.float32) / 255.0, "f", 32, 24, 10**9)
    c = load_preprocessed(u8.astype(np.uint16) * 257, "u16", 32, 24, 10**9)
    assert a.shape == (3, 24, 24) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)  # same picture, same (8-bit) path
    np.testing.assert_array_equal(a, c)
    # a float picture off the 8-bit grid goes through the float resize: still within 1/255
    d = load_preprocessed(np.clip(u8 / 255.0 + 1e-3, 0, 1).astype(np.float32), "f2", 32, 24, 10**9)
    assert np.abs(d - a).max() <= 1 / 255 + 1e-3 + 1e-6
    assert np.abs(d - a).max() > 0  # it really was the other path
    # a 2-D (grey) array is that channel repeated
    grey = load_preprocessed(u8[:, :, 0], "grey", 32, 24, 10**9)
    assert np.abs(grey[0] - a[0]).max() <= 1 / 255 + 1e-6


def test_uint8_and_float_batches_give_the_same_features():
    u8 = np.stack([rgb_u8(40, 40, s) for s in range(2)])
    model = SPADE(image_size=32, crop_size=32, k=1)
    g8, _ = model.extract(u8)
    gf, _ = model.extract(u8.astype(np.float32) / 255.0)
    torch.testing.assert_close(g8, gf)


def test_single_rgb_array_is_not_split_into_rows():
    img = rgb_u8(48, 40)  # (40, 48, 3): one colour image
    items, names = as_image_list(img)
    assert len(items) == 1 and items[0].shape == (40, 48, 3) and names == ["array[0]"]


def test_reading_in_threads_leaves_global_warning_filters_alone(tmp_path):
    for i in range(100):
        Image.fromarray(np.full((8, 8), i, dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
    items, names = as_image_list(tmp_path)
    before = list(warnings.filters)
    try:
        for _ in range(3):
            n = sum(x.shape[0] for _, x in iter_batches(items, names, Preprocessing(8, 8), 50))
            assert n == 100
            assert warnings.filters == before
    finally:
        warnings.filters[:] = before


# --------------------------------------------------------------------------------------------
# unique_stems
# --------------------------------------------------------------------------------------------
def test_unique_stems_without_collisions():
    assert unique_stems(["a/x.png", "b/y.jpg", "z.tiff", "c/v1.2.png"]) == ["x", "y", "z", "v1.2"]
    assert unique_stems([]) == []


def test_unique_stems_prefix_every_input_on_collision():
    paths = ["test/good/000.png", "test/crack/000.png", "test/crack/001.png"]
    assert unique_stems(paths) == ["good_000", "crack_000", "crack_001"]
    # a stem that already looks prefixed does not clash with a generated one
    assert unique_stems(["p/q_x.png", "q/x.png", "r/x.png"]) == ["p_q_x", "q_x", "r_x"]


def test_unique_stems_use_more_folders_when_the_parent_collides():
    # a folder per day, each with the same camera sub-folder: the day's name tells them apart
    paths = ["day1/cam/000.png", "day2/cam/000.png", "day2/cam/001.png"]
    assert unique_stems(paths) == ["day1_cam_000", "day2_cam_000", "day2_cam_001"]
    assert unique_stems(["one/good/000.png", "two/good/000.png"]) == ["one_good_000", "two_good_000"]


@pytest.mark.parametrize(
    "paths, dup",
    [
        (["a/x.png", "a/x.jpg"], "a_x"),
        (["d/x.png", "d/x.png"], "d_x"),
    ],
)
def test_unique_stems_unresolvable(paths, dup):
    with pytest.raises(SpadeError) as exc:
        unique_stems(paths)
    assert f"{dup!r}" in str(exc.value)
