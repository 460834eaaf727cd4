"""The video-frame dataset (paper's ShanghaiTech setting): order, subsampling, labels and masks
from PNG folders and .npy arrays, their geometry, every layout error, and SPADE end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_erosion

from spade_ad import SPADE, DatasetError, ImageError
from spade_ad.data import image_size_of, preprocess, read_image, read_mask
from spade_ad.evaluate import evaluate_dataset
from spade_ad.metrics import image_auroc, pixel_auroc
from spade_ad.video import (
    VIDEO_PRESET,
    VideoDataset,
    VideoFrame,
    load_video_frames,
    load_video_masks,
    natural_key,
)

H, W = 40, 56  # frame height and width: not square, so resizing distorts and rows != columns
SQ_ROWS, SQ_COLS = slice(12, 24), slice(28, 40)  # where the bright square (and the mask) is
N_TRAIN = 12  # frames per training video
# Anomalous frames (0-based position in their video) of the two masked test videos.
T1_BAD, T2_BAD = (3, 4), (1, 2)


def frame(t: float, rgb: bool, square: bool = False) -> np.ndarray:
    """A smooth pattern drifting with time ``t`` (uint8, grey or RGB); ``square`` paints it white."""
    yy, xx = np.mgrid[0:H, 0:W]
    base = 0.4 + 0.2 * np.sin(2 * np.pi * (3 * xx / W + t / 24)) * np.cos(2 * np.pi * 2 * yy / H)
    img = np.stack([base, base * 0.8 + 0.1, 1 - base], axis=2) if rgb else base
    if square:
        img[SQ_ROWS, SQ_COLS] = 1.0
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def square_mask() -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[SQ_ROWS, SQ_COLS] = True
    return m


def save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def build(root: Path) -> Path:
    """2 training videos x 12 frames; test: t1 (PNG masks), t2 (.npy masks), t3 (no masks).

    Frame names are unpadded (1.png ... 12.png) and videos are v2/v10, so plain string sorting
    would give the wrong order. v2 is grey and v10 RGB (two image modes); t1 matches v10, t2 v2.
    """
    for v, rgb, t0 in (("v2", False, 0.0), ("v10", True, 0.5)):
        for i in range(N_TRAIN):
            save(frame(t0 + 2 * i, rgb), root / "train" / v / f"{i + 1}.png")
    # Test frames sit between training frames in time: normal ones have a close neighbour.
    for i in range(6):
        save(frame(1.5 + 2 * i, True, square=i in T1_BAD), root / "test" / "t1" / f"{i + 1}.png")
        save(frame(1.0 + 2 * i, False, square=i in T2_BAD), root / "test" / "t2" / f"{i + 1}.png")
    for i in range(3):
        save(frame(3.0 + 2 * i, True), root / "test" / "t3" / f"{i + 1}.png")
    # t1: 0/255 masks for frames 1..5 (normal ones all zero); frame 6 has none (-> normal).
    for i in range(5):
        m = square_mask() if i in T1_BAD else np.zeros((H, W), dtype=bool)
        save(m.astype(np.uint8) * 255, root / "test_masks" / "t1" / f"{i + 1}.png")
    # t2: one 0/1 array, frames in order.
    arr = np.zeros((6, H, W), dtype=np.uint8)
    for i in T2_BAD:
        arr[i] = square_mask()
    np.save(root / "test_masks" / "t2.npy", arr)
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build(tmp_path / "stc")


def names(paths) -> list[str]:
    return [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]


# --------------------------------------------------------------------------------------------
# order, subsampling, labels
# --------------------------------------------------------------------------------------------
def test_natural_order_of_videos_and_frames(root: Path) -> None:
    ds = load_video_frames(root)
    assert isinstance(ds, VideoDataset) and ds.name == "stc"
    want = [f"v2/{i}.png" for i in range(1, 13)] + [f"v10/{i}.png" for i in range(1, 13)]
    assert names(ds.train) == want
    assert names(t.path for t in ds.test) == (
        [f"t1/{i}.png" for i in range(1, 7)]
        + [f"t2/{i}.png" for i in range(1, 7)]
        + [f"t3/{i}.png" for i in range(1, 4)]
    )
    assert [(t.video, t.index) for t in ds.test[:7]] == [("t1", i) for i in range(6)] + [("t2", 0)]
    assert all(isinstance(t, VideoFrame) and t.defect == t.video for t in ds.test)
    # Ties in number are broken by the full name, so the order is total and reproducible.
    assert sorted(["10.png", "2.png", "02.png", "a1.png", "1.png"], key=natural_key) == [
        "1.png",
        "02.png",
        "2.png",
        "10.png",
        "a1.png",
    ]


def test_subsampling_is_even_over_all_training_frames(root: Path) -> None:
    ds = load_video_frames(root, train_frames=5)
    # linspace(0, 23, 5) = 0, 5.75, 11.5, 17.25, 23 -> 0, 6, 12, 17, 23 across both videos.
    assert names(ds.train) == ["v2/1.png", "v2/7.png", "v10/1.png", "v10/6.png", "v10/12.png"]
    assert ds.n_train_total == 24
    assert names(load_video_frames(root, train_frames=1).train) == ["v2/1.png"]
    full = load_video_frames(root).train
    for t in range(2, 25):
        sub = load_video_frames(root, train_frames=t).train
        idx = np.array([full.index(p) for p in sub])
        assert len(sub) == t and idx[0] == 0 and idx[-1] == 23
        gaps = np.diff(idx)
        assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1, (t, idx)
    # More than there are: all of them, once each.
    assert load_video_frames(root, train_frames=100).train == full


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "5"])
def test_train_frames_must_be_a_positive_integer(root: Path, bad: object) -> None:
    with pytest.raises(DatasetError, match="train_frames"):
        load_video_frames(root, train_frames=bad)  # type: ignore[arg-type]


def test_labels_from_masks(root: Path) -> None:
    ds = load_video_frames(root, name="campus")
    assert ds.name == "campus"
    t1, t2, t3 = ds.test[:6], ds.test[6:12], ds.test[12:]
    assert [[t.label for t in part] for part in (t1, t2, t3)] == [[0, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0]]
    assert [t.mask_file.name if t.mask_file else None for t in t1] == [
        "1.png",
        "2.png",
        "3.png",
        "4.png",
        "5.png",
        None,
    ]
    assert all(t.mask_array == root / "test_masks" / "t2.npy" and t.mask_file is None for t in t2)
    assert all(t.mask_file is None and t.mask_array is None for t in t3)
    # The generic field stays empty so that read_mask is never pointed at an .npy.
    assert all(t.mask is None for t in ds.test)


# --------------------------------------------------------------------------------------------
# mask geometry
# --------------------------------------------------------------------------------------------
def nearest_square(image_size: int, crop_size: int) -> np.ndarray:
    """Where the square must land, computed independently of Pillow: nearest source pixel of each
    output pixel centre, ``floor((x + 0.5) * src / dst)``, then the centre crop."""
    ys = np.floor((np.arange(image_size) + 0.5) * H / image_size).astype(int)
    xs = np.floor((np.arange(image_size) + 0.5) * W / image_size).astype(int)
    big = square_mask()[np.ix_(ys, xs)]
    off = (image_size - crop_size) // 2
    return big[off : off + crop_size, off : off + crop_size]


@pytest.mark.parametrize("image_size,crop_size", [(48, 40), (32, 32), (64, 56)])
def test_png_and_npy_masks_align_with_the_preprocessed_frame(root: Path, image_size: int, crop_size: int) -> None:
    ds = load_video_frames(root)
    masks = load_video_masks(ds, image_size, crop_size)
    assert masks.shape == (15, crop_size, crop_size) and masks.dtype == bool
    want = nearest_square(image_size, crop_size)
    assert want.sum() > 20  # the square survives the crop: the comparison below is not vacuous
    bad = {3, 4, 7, 8}  # t1 frames 3, 4 and t2 frames 1, 2 in test order
    for i in range(15):
        np.testing.assert_array_equal(masks[i], want if i in bad else np.zeros_like(want), err_msg=str(i))
    # The PNG path is read_mask itself, and the .npy path gives what read_mask gives on the same mask.
    np.testing.assert_array_equal(masks[3], read_mask(ds.test[3].mask_file, image_size, crop_size))
    np.testing.assert_array_equal(masks[7], masks[3])
    assert VideoDataset.load_masks(ds, image_size, crop_size).tolist() == masks.tolist()
    # And the mask covers the square in the preprocessed frame: white inside (away from the
    # bilinear edge), no white pixel outside it.
    for i in (3, 7):
        img = preprocess(read_image(ds.test[i].path), image_size, crop_size).min(axis=0)
        assert (img[binary_erosion(masks[i], iterations=2)] > 0.99).all()
        assert not (img[~masks[i]] > 0.99).any()


def test_npy_masks_threshold_above_zero(tmp_path: Path) -> None:
    # Any value > 0 is anomalous in an array (float or bool), unlike PNGs (half scale).
    root = build(tmp_path / "stc")
    arr = np.zeros((6, H, W), dtype=np.float32)
    arr[0, SQ_ROWS, SQ_COLS] = 0.01
    np.save(root / "test_masks" / "t2.npy", arr)
    ds = load_video_frames(root)
    assert [t.label for t in ds.test[6:12]] == [1, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(load_video_masks(ds, 48, 40)[6], nearest_square(48, 40))
    np.save(root / "test_masks" / "t2.npy", arr > 0)
    assert [t.label for t in load_video_frames(root).test[6:12]] == [1, 0, 0, 0, 0, 0]


# --------------------------------------------------------------------------------------------
# layout errors, each naming the file
# --------------------------------------------------------------------------------------------
def test_empty_train_or_test_is_an_error(root: Path) -> None:
    shutil.rmtree(root / "train")
    (root / "train").mkdir()
    with pytest.raises(DatasetError, match=r"train: no training videos"):
        load_video_frames(root)
    build(root)
    for f in (root / "train" / "v10").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"v10: folder contains no images"):
        load_video_frames(root)
    build(root)
    shutil.rmtree(root / "test")
    with pytest.raises(DatasetError, match=r"stc/test: no test folder"):
        load_video_frames(root)
    (root / "test").mkdir()
    with pytest.raises(DatasetError, match=r"test: no test videos"):
        load_video_frames(root)
    with pytest.raises(DatasetError, match="no such dataset folder"):
        load_video_frames(root / "missing")


def test_png_mask_without_frame(root: Path) -> None:
    save(square_mask().astype(np.uint8) * 255, root / "test_masks" / "t1" / "99.png")
    with pytest.raises(DatasetError, match=r"t1/99\.png: mask has no matching frame"):
        load_video_frames(root)


def test_npy_frame_count_must_match(root: Path) -> None:
    np.save(root / "test_masks" / "t2.npy", np.zeros((5, H, W), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"t2\.npy: mask array has 5 frames but video .*t2 has 6"):
        load_video_frames(root)
    np.save(root / "test_masks" / "t2.npy", np.zeros((6 * H, W), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"t2\.npy: mask array has shape \(240, 56\)"):
        load_video_frames(root)
    np.save(root / "test_masks" / "t2.npy", np.array([None] * 6, dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match=r"t2\.npy: cannot be read"):
        load_video_frames(root)


def test_mask_size_must_match_frame(root: Path) -> None:
    # PNG mask transposed in size (W and H swapped).
    save(np.zeros((W, H), dtype=np.uint8), root / "test_masks" / "t1" / "2.png")
    with pytest.raises(ImageError, match=r"t1/2\.png: mask is 40x56 but its frame 2\.png is 56x40"):
        load_video_frames(root)
    build(root)
    np.save(root / "test_masks" / "t2.npy", np.zeros((6, H, W + 1), dtype=np.uint8))
    with pytest.raises(ImageError, match=r"t2\.npy: masks are 57x40 \(WxH\) but frame 1\.png is 56x40"):
        load_video_frames(root)
    # One frame of another size inside a video with an .npy is caught too.
    build(root)
    save(np.zeros((H + 2, W), dtype=np.uint8), root / "test" / "t2" / "4.png")
    assert image_size_of(root / "test" / "t2" / "4.png") == (W, H + 2)
    with pytest.raises(ImageError, match=r"t2\.npy: .* frame 4\.png is 56x42"):
        load_video_frames(root)


def test_mask_folder_and_npy_for_one_video(root: Path) -> None:
    np.save(root / "test_masks" / "t1.npy", np.zeros((6, H, W), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"test_masks/t1 and .*test_masks/t1\.npy: video 't1' has both"):
        load_video_frames(root)


def test_masks_for_an_unknown_video(root: Path) -> None:
    np.save(root / "test_masks" / "t9.npy", np.zeros((6, H, W), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"t9\.npy: masks for video 't9' but no folder"):
        load_video_frames(root)
    (root / "test_masks" / "t9.npy").unlink()
    save(np.zeros((H, W), dtype=np.uint8), root / "test_masks" / "t8" / "1.png")
    with pytest.raises(DatasetError, match=r"test_masks/t8: masks for video 't8'"):
        load_video_frames(root)


def test_bad_mask_values(root: Path) -> None:
    # A 0/1 PNG would give label 1 but an empty mask after read_mask's half-scale threshold.
    save(square_mask().astype(np.uint8), root / "test_masks" / "t1" / "4.png")
    with pytest.raises(ImageError, match=r"t1/4\.png: mask has non-zero values but none above half scale"):
        load_video_frames(root)
    build(root)
    save(square_mask().astype(np.uint8) * 255, root / "test_masks" / "t1" / "4.jpg")
    with pytest.raises(DatasetError, match=r"t1/4\.jpg and .*t1/4\.png: two masks for the same frame"):
        load_video_frames(root)
    (root / "test_masks" / "t1" / "4.jpg").unlink()
    arr = np.zeros((6, H, W), dtype=np.float32)
    arr[2, 0, 0] = np.nan
    np.save(root / "test_masks" / "t2.npy", arr)
    with pytest.raises(DatasetError, match=r"t2\.npy: mask of frame 2 \(3\.png\) holds NaN"):
        load_video_frames(root)


# --------------------------------------------------------------------------------------------
# end to end with SPADE
# --------------------------------------------------------------------------------------------
def test_spade_finds_the_anomalous_frames(root: Path) -> None:
    assert VIDEO_PRESET == {"k": 1}
    ds = load_video_frames(root, train_frames=16)
    assert len(ds.train) == 16
    model = SPADE(**VIDEO_PRESET, image_size=32, crop_size=32).fit(ds.train)
    pred = model.predict([t.path for t in ds.test])
    labels = np.array([t.label for t in ds.test])
    masks = load_video_masks(ds, 32, 32)
    img_auc = image_auroc(labels, pred.image_scores)
    pix_auc = pixel_auroc(masks, pred.anomaly_maps)
    assert img_auc >= 0.9, (img_auc, pred.image_scores, labels)
    assert pix_auc >= 0.9, pix_auc
    # k=1: each test frame is compared with its single nearest training frame.
    assert pred.neighbors.shape == (15, 1)
    # evaluate_dataset reads the video masks (PNG and .npy) through the dataset's own load_masks.
    res = evaluate_dataset(ds, lambda: SPADE(**VIDEO_PRESET, image_size=32, crop_size=32))
    assert res.n_train == 16 and res.n_test == 15
    assert res.image_auroc == pytest.approx(img_auc)
    assert res.pixel_auroc == pytest.approx(pix_auc, abs=1e-6) and res.pro is not None
    np.testing.assert_allclose(res.prediction.image_scores, pred.image_scores, rtol=1e-5)


def test_cli_evaluate_video_uses_k1_and_subsamples(root: Path, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from spade_ad.cli import main

    js = tmp_path / "v.json"
    r = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--video",
            str(root),
            "--train-frames",
            "16",
            "--image-size",
            "32",
            "--crop-size",
            "32",
            "--json",
            str(js),
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    rec = data[root.name]
    assert data["config"]["k"] == 1 and rec["n_train"] == 16 and rec["n_test"] == 15
    assert rec["image_auroc"] >= 0.9 and rec["pixel_auroc"] >= 0.9
