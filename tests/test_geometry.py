"""Aspect-ratio-preserving geometry (``geometry="pad"``): preprocessing, masks, valid regions, and
metrics that count only the image's own pixels."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from spade_ad import SPADE
from spade_ad.data import load_mvtec, placed_box, preprocess, read_mask, valid_region
from spade_ad.evaluate import evaluate_dataset
from spade_ad.metrics import pixel_auroc, pro_auc


@pytest.mark.parametrize("h,w,box", [(40, 20, (0, 12, 48, 24)), (20, 40, (12, 0, 24, 48)), (30, 30, (0, 0, 48, 48))])
def test_placed_box_keeps_the_aspect_ratio(h, w, box):
    assert placed_box(h, w, 48, "pad") == box
    assert placed_box(h, w, 48, "squash") == (0, 0, 48, 48)


def test_pad_preprocess_places_the_resized_image_and_pads_with_its_mean():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(20, 40, 3)).astype(np.uint8)
    out = preprocess(img.astype(np.float32) / 255, 48, 48, "pad")  # (3, 48, 48)
    want = np.asarray(Image.fromarray(img).resize((48, 24), Image.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(out[:, 12:36].transpose(1, 2, 0), want, atol=1e-6)
    mean = want.reshape(-1, 3).mean(0)
    np.testing.assert_allclose(out[:, :12].transpose(1, 2, 0), np.broadcast_to(mean, (12, 48, 3)), atol=1e-6)
    np.testing.assert_allclose(out[:, 36:].transpose(1, 2, 0), np.broadcast_to(mean, (12, 48, 3)), atol=1e-6)
    # Crop after padding: the valid region is the placed box cut by the crop.
    v = valid_region(20, 40, 48, 40, "pad")
    assert v.shape == (40, 40) and v.sum() == 24 * 40 and v[8:32].all() and not v[:8].any()


def test_pad_mask_follows_the_image_and_padding_is_defect_free(tmp_path):
    mask = np.zeros((20, 40), np.uint8)
    mask[5:10, 30:40] = 255  # right end of a landscape image
    Image.fromarray(mask).save(tmp_path / "m.png")
    m = read_mask(tmp_path / "m.png", 48, 48, geometry="pad")
    assert m.shape == (48, 48)
    ys, xs = np.nonzero(m)
    # Rows 5..9 of 20 -> 12 + 12..23 (scale 1.2); columns 30..39 of 40 -> 36..47.
    assert ys.min() == 12 + 6 and ys.max() == 12 + 11 and xs.min() == 36 and xs.max() == 47
    assert not m[:12].any() and not m[36:].any()


def test_metrics_with_valid_equal_metrics_on_the_valid_pixels_only():
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 16, 16), bool)
    masks[:3, 6:9, 6:10] = True
    maps = rng.random((6, 16, 16)).astype(np.float32) + masks
    valid = np.zeros_like(masks)
    valid[:, 4:12, :] = True
    # Garbage outside the valid area must not matter.
    noisy = maps.copy()
    noisy[~valid] = 100.0
    inner_masks, inner_maps = masks[:, 4:12], maps[:, 4:12]
    assert pixel_auroc(masks, noisy, valid=valid) == pytest.approx(pixel_auroc(inner_masks, inner_maps), abs=1e-12)
    assert pro_auc(masks, noisy, valid=valid) == pytest.approx(pro_auc(inner_masks, inner_maps), abs=1e-12)
    assert pixel_auroc(masks, noisy) != pytest.approx(pixel_auroc(masks, noisy, valid=valid))
    with pytest.raises(ValueError, match="valid"):
        pixel_auroc(masks, maps, valid=valid[:, :8])


@pytest.fixture
def wide_mvtec(tmp_path):
    """MVTec layout with landscape 32x64 images and a defect near the right border."""
    rng = np.random.default_rng(2)
    cat = tmp_path / "wide"
    for d in ("train/good", "test/good", "test/square", "ground_truth/square"):
        (cat / d).mkdir(parents=True)

    def wide(defect: bool) -> np.ndarray:
        img = np.concatenate([make_image(rng, 32), make_image(rng, 32)], axis=1)
        if defect:
            img[10:18, 50:58] = [255, 255, 0]
        return img

    for i in range(6):
        Image.fromarray(wide(False)).save(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        Image.fromarray(wide(False)).save(cat / "test" / "good" / f"{i:03d}.png")
        Image.fromarray(wide(True)).save(cat / "test" / "square" / f"{i:03d}.png")
        mask = np.zeros((32, 64), np.uint8)
        mask[10:18, 50:58] = 255
        Image.fromarray(mask).save(cat / "ground_truth" / "square" / f"{i:03d}_mask.png")
    return tmp_path


def test_pad_model_predicts_valid_regions_and_round_trips(wide_mvtec, tmp_path):
    ds = load_mvtec(wide_mvtec, "wide")
    model = SPADE(image_size=64, crop_size=64, k=3, geometry="pad", image_score="map_max").fit(ds.train)
    pred = model.predict([t.path for t in ds.test])
    assert pred.valid.shape == (4, 64, 64) and pred.valid.sum(axis=(1, 2)).tolist() == [32 * 64] * 4
    assert pred.valid[:, 16:48].all() and not pred.valid[:, :16].any()
    # map_max looks only at the image, not at the padding.
    np.testing.assert_allclose(pred.image_scores, pred.anomaly_maps[:, 16:48].reshape(4, -1).max(1), rtol=1e-6)
    loaded = SPADE.load(model.save(tmp_path / "pad.safetensors"))
    assert loaded.geometry == "pad"
    np.testing.assert_array_equal(loaded.predict([t.path for t in ds.test]).anomaly_maps, pred.anomaly_maps)


def test_evaluate_with_pad_counts_only_image_pixels(wide_mvtec):
    ds = load_mvtec(wide_mvtec, "wide")
    r = evaluate_dataset(ds, lambda: SPADE(image_size=64, crop_size=64, k=3, geometry="pad"))
    assert r.masks.shape == (4, 64, 64) and not r.masks[:, :16].any()
    want = pixel_auroc(r.masks[:, 16:48], r.prediction.anomaly_maps[:, 16:48])
    assert r.pixel_auroc == pytest.approx(want, abs=1e-12)
    assert r.pro == pytest.approx(pro_auc(r.masks[:, 16:48], r.prediction.anomaly_maps[:, 16:48]), abs=1e-12)
    assert r.model_config["preprocessing"]["geometry"] == "pad"
