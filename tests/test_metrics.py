"""Tests for spade_ad.metrics.

Expected values are worked out by hand in the comments (never with the code under test); the
only oracles used are sklearn's roc_auc_score for the ROC cross-checks and a brute-force
threshold loop written here for the PRO cross-check.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from spade_ad import metrics
from spade_ad.metrics import (
    image_auroc,
    pixel_auroc,
    pro_auc,
    pro_curve,
    roc_curve_points,
    trapezoid,
)

ATOL = 1e-12  # curve points are sums of a few fractions; allow only float rounding


def assert_curve(got, fprs, pros):
    """Compare a (fprs, pros) pair to hand-computed points, including the number of points."""
    got_f, got_p = got
    assert got_f.dtype == np.float64 and got_p.dtype == np.float64
    np.testing.assert_allclose(got_f, fprs, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got_p, pros, rtol=0, atol=ATOL)


def square_defect_4x4():
    """1x4x4 mask with a 2x2 defect in the top-left corner: 1 region of 4 px, 12 OK px."""
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, :2, :2] = True
    return masks


# --------------------------------------------------------------------------- perfect / inverted


def test_perfect_scores():
    # Every anomalous image outscores every normal one: all 2*2 pairs ordered right -> 1.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0

    masks = square_defect_4x4()
    maps = masks.astype(np.float64)  # defect pixels 1, OK pixels 0
    # All 4*12 (defect, OK) pixel pairs are ordered right -> 1.
    assert pixel_auroc(masks, maps) == 1.0
    # Runs in decreasing score: 4 defect px at 1 -> (FPR 0, PRO 4*(1/4)/1 = 1);
    # 12 OK px at 0 -> (12/12, 1). Plus the (0,0) and (1,1) padding.
    assert_curve(pro_curve(masks, maps), [0, 0, 1, 1], [0, 1, 1, 1])
    # PRO is 1 on all of (0, 0.3]: area 0.3, normalised 0.3 / 0.3 = 1.
    assert pro_auc(masks, maps) == pytest.approx(1.0, abs=ATOL)


def test_inverted_scores():
    # Every anomalous image scores below every normal one: 0 of 4 pairs right -> 0.
    assert image_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    masks = square_defect_4x4()
    assert pixel_auroc(masks, 1.0 - masks) == 0.0


def test_inverted_map_has_zero_pro_in_first_30_percent():
    # 1x10x10 image, 2x2 defect (4 px = 4 % of the image), 96 OK px. Inverted map with distinct
    # scores: every OK pixel outscores every defect pixel. Lowering the threshold therefore
    # passes all 96 OK pixels first (FPR k/96, PRO 0 for k = 1..96), then the 4 defect pixels
    # one by one (FPR 1, PRO 1/4, 2/4, 3/4, 1). So PRO = 0 for every FPR < 1, in particular
    # on [0, 0.3], and AU-PRO@0.3 = 0.
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 4:6, 4:6] = True
    maps = np.empty((1, 10, 10))
    maps[~masks] = 1.0 + np.arange(96)  # OK: 1 .. 96
    maps[masks] = -np.arange(4.0)  # defect: 0, -1, -2, -3
    fprs, pros = pro_curve(masks, maps)
    expected_f = np.concatenate(([0.0], np.arange(1, 97) / 96, [1, 1, 1, 1], [1]))
    expected_p = np.concatenate(([0.0], np.zeros(96), [0.25, 0.5, 0.75, 1], [1]))
    assert_curve((fprs, pros), expected_f, expected_p)
    assert pro_auc(masks, maps) == 0.0


# --------------------------------------------------------------------------- PRO specifics


def test_pro_is_a_per_region_average():
    # 1x4x4: small region = 1 px at (0,0); large region = 3 px at (3,1..3) (not touching, even
    # diagonally). 12 OK px. Scores: small 0.9 > OK 0.5 > large 0.1.
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 3, 1:] = True
    maps = np.full((1, 4, 4), 0.5)
    maps[0, 0, 0] = 0.9
    maps[0, 3, 1:] = 0.1
    # Runs: 0.9 -> small fully found, no FP: (0, (1 + 0)/2 = 0.5)  [per-pixel would be 1/4];
    #       0.5 -> 12 OK px: (12/12, 0.5);
    #       0.1 -> 3 large px, each +1/3 of a region: (1, (1 + 1)/2 = 1).
    assert_curve(pro_curve(masks, maps), [0, 0, 1, 1, 1], [0, 0.5, 0.5, 1, 1])
    # PRO 0.5 flat on [0, 0.3]: AU-PRO = 0.5.
    assert pro_auc(masks, maps) == pytest.approx(0.5, abs=ATOL)


def test_regions_use_8_connectivity():
    # Defect pixels (0,0), (0,1) and (1,2): (0,1)-(1,2) touch diagonally, so with
    # 8-connectivity this is ONE region of 3 px (4-connectivity would give 2 regions).
    # 1x3x3 image, 6 OK px. Scores: (1,2) 0.9 > OK 0.5 > (0,0),(0,1) 0.1.
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True
    maps = np.full((1, 3, 3), 0.5)
    maps[0, 1, 2] = 0.9
    maps[0, 0, :2] = 0.1
    # 0.9 -> 1 of 3 px of the single region: (0, 1/3)   [4-connectivity would give (1 + 0)/2];
    # 0.5 -> 6 OK px: (1, 1/3); 0.1 -> rest of region: (1, 1).
    assert_curve(pro_curve(masks, maps), [0, 0, 1, 1, 1], [0, 1 / 3, 1 / 3, 1, 1])


def test_regions_in_different_images_are_separate():
    # Two 1x3 images, each with one defect pixel at column 0 -> 2 regions; 4 OK px in total.
    masks = np.array([[[1, 0, 0]], [[1, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.5, 0.5]], [[0.1, 0.5, 0.5]]])
    # 0.9 -> region of image 0: (0, 1/2); 0.5 -> 4 OK px: (4/4, 1/2); 0.1 -> (1, 2/2).
    assert_curve(pro_curve(masks, maps), [0, 0, 1, 1, 1], [0, 0.5, 0.5, 1, 1])


def test_all_equal_scores_give_a_single_tied_point():
    # One run of 16 tied scores -> one point, taken after all 16 px: (FPR 12/12, PRO 4*(1/4)).
    # No intermediate point such as (0, 1/4) may appear. With padding: (0,0), (1,1), (1,1).
    masks = square_defect_4x4()
    maps = np.full((1, 4, 4), 0.5)
    assert_curve(pro_curve(masks, maps), [0, 1, 1], [0, 1, 1])
    # Curve is the diagonal y = x on [0, 1]: area up to 0.3 = 0.3**2 / 2 = 0.045; /0.3 = 0.15.
    # (trapezoid: 0.3 between x=0 and x=1, y_interp = 0.3, correction 0.5*(0.3+0)*0.3.)
    assert pro_auc(masks, maps) == pytest.approx(0.15, abs=ATOL)


def test_tied_defect_and_ok_pixels_move_together():
    # 1x1x5: region = px 0,1 (adjacent, 2 px); OK = px 2,3,4 (3 px).
    masks = np.array([[[1, 1, 0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.5, 0.5, 0.1, 0.1]]])
    # 0.9 -> half the region: (0, 1/2).
    # 0.5 -> region px 1 AND OK px 2 together: (1/3, 1). Neither (0, 1) nor (1/3, 1/2) may
    #        appear, whichever order the sort put the tied pixels in.
    # 0.1 -> OK px 3, 4: (3/3, 1).
    assert_curve(pro_curve(masks, maps), [0, 0, 1 / 3, 1, 1], [0, 0.5, 1, 1, 1])
    # AU-PRO@0.3: 0.3 lies between x=0 (y=0.5) and x=1/3 (y=1): y_interp = 0.5 + 0.5*0.3*3 =
    # 0.95, area = 0.5*(0.5 + 0.95)*0.3 = 0.2175 (the points at x <= 0.3 are both at x = 0 and
    # add nothing). 0.2175 / 0.3 = 0.725.
    assert pro_auc(masks, maps) == pytest.approx(0.725, abs=ATOL)


def test_image_without_defect_only_adds_to_fpr_denominator():
    # Image 0 (1x4): region = px 0,1 (2 px), OK = px 2,3. Image 1 (1x4): no defect, 4 OK px.
    # -> 1 region, 2 + 4 = 6 OK px (without image 1 the denominator would be 2).
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]]], dtype=np.uint8)
    maps = np.array([[[0.9, 0.3, 0.5, 0.1]], [[0.7, 0.2, 0.2, 0.2]]])
    # 0.9 region   -> (0, 1/2)
    # 0.7 OK img1  -> (1/6, 1/2)
    # 0.5 OK img0  -> (2/6, 1/2)
    # 0.3 region   -> (2/6, 1)
    # 0.2 OK img1 x3 -> (5/6, 1)
    # 0.1 OK img0  -> (6/6, 1)
    assert_curve(
        pro_curve(masks, maps),
        [0, 0, 1 / 6, 2 / 6, 2 / 6, 5 / 6, 1, 1],
        [0, 0.5, 0.5, 0.5, 1, 1, 1, 1],
    )
    # PRO = 0.5 on all of [0, 0.3] (0.3 < 2/6) -> AU-PRO 0.5.
    assert pro_auc(masks, maps) == pytest.approx(0.5, abs=ATOL)


def test_pro_auc_hand_computed_4x4():
    # Region = 2x2 top-left block (4 px, scores 0.9, 0.7, 0.5, 0.1), 12 OK px
    # (scores 0.85, 0.6, 0.35, 0.2 and eight 0.0). Some OK px outscore part of the region.
    masks = square_defect_4x4()
    maps = np.array(
        [
            [
                [0.9, 0.7, 0.85, 0.0],
                [0.5, 0.1, 0.6, 0.0],
                [0.35, 0.2, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0],
            ]
        ]
    )
    # Decreasing scores (R = region px, +1/4 PRO; OK px +1/12 FPR):
    # 0.9 R -> (0, 1/4); 0.85 OK -> (1/12, 1/4); 0.7 R -> (1/12, 2/4); 0.6 OK -> (2/12, 2/4);
    # 0.5 R -> (2/12, 3/4); 0.35 OK -> (3/12, 3/4); 0.2 OK -> (4/12, 3/4); 0.1 R -> (4/12, 1);
    # 0.0 x8 OK -> (1, 1).
    assert_curve(
        pro_curve(masks, maps),
        [0, 0, 1 / 12, 1 / 12, 2 / 12, 2 / 12, 3 / 12, 4 / 12, 4 / 12, 1, 1],
        [0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 0.75, 1, 1, 1],
    )
    # Area up to 0.3: steps 0.25, 0.5, 0.75 each 1/12 wide -> 1.5/12 = 0.125; then from
    # 3/12 = 0.25 to 0.3 at PRO 0.75 (neighbours 0.75 and 0.75) -> 0.05 * 0.75 = 0.0375.
    # Total 0.1625; / 0.3 = 13/24.
    assert pro_auc(masks, maps) == pytest.approx(13 / 24, abs=ATOL)
    # Pixel AUROC by counting (defect, OK) pairs: 0.9 beats 12, 0.7 beats 11, 0.5 beats 10,
    # 0.1 beats the eight zeros -> 41 of 4*12 = 48 pairs.
    assert pixel_auroc(masks, maps) == pytest.approx(41 / 48, abs=ATOL)


def test_pro_curve_matches_brute_force_threshold_loop():
    # Independent reference: for every distinct score t (decreasing), FPR = share of OK px
    # with score >= t, PRO = mean over regions of the share of the region with score >= t.
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 8, 8] = True
    masks[1, 5:11, 1:3] = True
    # image 2 has no defect
    maps = np.round(rng.random((3, 12, 12)) + 0.3 * masks, 1)  # rounding -> many ties
    regions = []
    for i in range(3):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [maps[i][lab == k] for k in range(1, n + 1)]
    ok_scores = maps[~masks]
    ref_f, ref_p = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        ref_f.append(np.mean(ok_scores >= t))
        ref_p.append(np.mean([np.mean(r >= t) for r in regions]))
    ref_f.append(1.0)
    ref_p.append(1.0)
    assert_curve(pro_curve(masks, maps), ref_f, ref_p)


# --------------------------------------------------------------------------- trapezoid

X = [0.0, 0.2, 0.4, 1.0]
Y = [0.0, 0.4, 0.6, 1.0]


def test_trapezoid_interpolates_at_x_max_between_points():
    # 0.3 lies between 0.2 and 0.4: y(0.3) = 0.4 + (0.6-0.4)*(0.1/0.2) = 0.5.
    # [0, 0.2]: 0.5*(0 + 0.4)*0.2 = 0.04; [0.2, 0.3]: 0.5*(0.4 + 0.5)*0.1 = 0.045. Sum 0.085.
    assert trapezoid(X, Y, x_max=0.3) == pytest.approx(0.085, abs=ATOL)


def test_trapezoid_x_max_on_a_point():
    # x_max = 0.4 is a sample: no interpolation. 0.04 + 0.5*(0.4 + 0.6)*0.2 = 0.14.
    assert trapezoid(X, Y, x_max=0.4) == pytest.approx(0.14, abs=ATOL)


def test_trapezoid_whole_range_and_vertical_steps():
    # No limit: 0.14 + 0.5*(0.6 + 1)*0.6 = 0.62.
    assert trapezoid(X, Y) == pytest.approx(0.62, abs=ATOL)
    # A repeated x (vertical step) adds nothing: [0, 0.3] at y from 0 to 0.2 -> 0.03, the jump
    # to 0.6 at x = 0.3 is kept (x <= x_max) but has zero width.
    assert trapezoid([0, 0.3, 0.3, 1], [0, 0.2, 0.6, 1], x_max=0.3) == pytest.approx(0.03, abs=ATOL)


def test_trapezoid_drops_non_finite_points_with_warning():
    # Same curve as above with a NaN point inserted: result still 0.085.
    with pytest.warns(RuntimeWarning, match="non-finite"):
        got = trapezoid([0.0, 0.2, np.nan, 0.4, 1.0], [0.0, 0.4, 5.0, 0.6, 1.0], x_max=0.3)
    assert got == pytest.approx(0.085, abs=ATOL)


@pytest.mark.parametrize("x_max", [-0.1, 1.5])
def test_trapezoid_x_max_outside_range(x_max):
    with pytest.raises(ValueError, match="outside the range"):
        trapezoid(X, Y, x_max=x_max)


# --------------------------------------------------------------------------- sklearn cross-checks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aurocs_match_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = (0, 1)  # both classes present
    scores = rng.normal(size=40) + labels
    assert image_auroc(labels, scores) == roc_auc_score(labels, scores)

    masks = rng.random((3, 8, 9)) < 0.2
    maps = np.round(rng.normal(size=(3, 8, 9)) + masks, 1).astype(np.float32)  # with ties
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    got = pixel_auroc(masks.astype(np.uint8), maps)
    assert isinstance(got, float)
    assert got == expected


def test_constant_scores_give_half():
    # All pairs tied, each counts 1/2 (sklearn convention).
    assert image_auroc([0, 1, 0, 1, 1], [3.0] * 5) == 0.5
    assert pixel_auroc(square_defect_4x4(), np.zeros((1, 4, 4))) == 0.5


def test_roc_curve_points():
    # labels [0, 0, 1, 1], scores [0.1, 0.4, 0.35, 0.8] (sklearn's doc example):
    # thresholds 0.8 -> (0, 1/2), 0.4 -> (1/2, 1/2), 0.35 -> (1/2, 1), 0.1 -> (1, 1); sklearn
    # prepends (0, 0) and drops no point here (each is a corner).
    fpr, tpr = roc_curve_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])


def test_pixel_auroc_does_not_copy_scores(monkeypatch):
    # A contiguous float32 map must reach sklearn as a view (no float64 copy of ~30M pixels),
    # and bool masks likewise.
    seen = {}

    def fake_roc_auc_score(y_true, y_score):
        seen["y_true"], seen["y_score"] = y_true, y_score
        return 0.25

    monkeypatch.setattr(metrics, "roc_auc_score", fake_roc_auc_score)
    masks = square_defect_4x4()
    maps = np.zeros((1, 4, 4), dtype=np.float32)
    assert pixel_auroc(masks, maps) == 0.25
    assert np.shares_memory(seen["y_score"], maps)
    assert np.shares_memory(seen["y_true"], masks)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_image_auroc_one_class(labels):
    with pytest.raises(ValueError, match="only one class"):
        image_auroc(labels, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        roc_curve_points(labels, [0.1, 0.2, 0.3])


def test_image_auroc_bad_labels_and_lengths():
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        image_auroc([0, 1, 1], [0.1, 0.2])


@pytest.mark.parametrize("value", [0, 1])
def test_pixel_auroc_one_class(value):
    with pytest.raises(ValueError, match="only one class"):
        pixel_auroc(np.full((2, 3, 3), value), np.zeros((2, 3, 3)))


@pytest.mark.parametrize("func", [pixel_auroc, pro_curve, pro_auc])
@pytest.mark.parametrize(
    ("mask_shape", "map_shape"),
    [((1, 4, 4), (1, 4, 5)), ((2, 4, 4), (1, 4, 4)), ((4, 4), (4, 4))],
)
def test_shape_mismatch(func, mask_shape, map_shape):
    masks = np.zeros(mask_shape, dtype=bool)
    masks[..., 0, 0] = True
    with pytest.raises(ValueError, match=r"masks \(.*\) and maps \(.*\)"):
        func(masks, np.zeros(map_shape))


def test_pro_curve_needs_a_region_and_an_ok_pixel():
    with pytest.raises(ValueError, match="no defect region"):
        pro_curve(np.zeros((2, 3, 3), dtype=bool), np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="no defect-free pixel"):
        pro_curve(np.ones((2, 3, 3), dtype=bool), np.zeros((2, 3, 3)))


def test_non_finite_maps_rejected():
    maps = np.zeros((1, 4, 4))
    maps[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pro_curve(square_defect_4x4(), maps)
    with pytest.raises(ValueError):
        pixel_auroc(square_defect_4x4(), maps)  # sklearn rejects NaN itself


@pytest.mark.parametrize("limit", [0.0, -0.3, 1.5])
def test_pro_auc_bad_limit(limit):
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_auc(square_defect_4x4(), np.zeros((1, 4, 4)), fpr_limit=limit)
