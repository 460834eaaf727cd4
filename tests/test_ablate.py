"""Ablations: derived rows equal full evaluations, and the backbone runs once per split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image  # tests/ is on sys.path (pytest rootdir conftest)
from PIL import Image

from spade_ad import SPADE, SpadeError
from spade_ad.ablate import _plan, random_galleries, run_ablation
from spade_ad.backbones import Backbone
from spade_ad.data import Dataset, load_mvtec
from spade_ad.evaluate import evaluate_dataset

SMALL = {"image_size": 48, "crop_size": 48, "k": 4}
KS = (1, 2, 4)
N_TRAIN, N_GOOD, N_BAD = 8, 3, 4


def _make_dataset(root: Path) -> Dataset:
    """MVTec layout: 8 normal training images; 3 normal and 4 defective test images with masks."""
    rng = np.random.default_rng(0)
    cat = root / "cat"
    for sub in ("train/good", "test/good", "test/square", "ground_truth/square"):
        (cat / sub).mkdir(parents=True)
    for i in range(N_TRAIN):
        Image.fromarray(make_image(rng)).save(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(N_GOOD):
        Image.fromarray(make_image(rng)).save(cat / "test" / "good" / f"{i:03d}.png")
    for i in range(N_BAD):
        Image.fromarray(make_image(rng, defect=True)).save(cat / "test" / "square" / f"{i:03d}.png")
        mask = np.zeros((48, 48), dtype=np.uint8)
        mask[16:24, 24:32] = 255  # where make_image puts the square
        Image.fromarray(mask).save(cat / "ground_truth" / "square" / f"{i:03d}_mask.png")
    return load_mvtec(root, "cat")


@pytest.fixture(scope="module")
def ablation(tmp_path_factory: pytest.TempPathFactory):
    """(dataset, result, backbone batch sizes, number of per-image pixel searches) of one counted run."""
    ds = _make_dataset(tmp_path_factory.mktemp("ablate"))
    batches: list[int] = []
    searches = [0]
    forward, level_maps = Backbone.forward, SPADE._level_maps

    def counting_forward(self, x):
        batches.append(int(x.shape[0]))
        return forward(self, x)

    def counting_level_maps(self, *args, **kwargs):
        searches[0] += 1
        return level_maps(self, *args, **kwargs)

    # Same thread count as the function-scoped tests, so features are bitwise comparable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Backbone, "forward", counting_forward)
            mp.setattr(SPADE, "_level_maps", counting_level_maps)
            result = run_ablation(ds, SPADE(**SMALL), seed=0, ks=KS, keep_maps=True)
    finally:
        torch.set_num_threads(threads)
    return ds, result, batches, searches[0]


def _row(result, group: str, **match):
    rows = [r for r in result.rows if r.group == group and all(getattr(r, k) == v for k, v in match.items())]
    assert len(rows) == 1, rows
    return rows[0]


def test_backbone_runs_once_per_split(ablation):
    ds, _, batches, searches = ablation
    # One batch over the 8 training images, one over the 7 test images, nothing else.
    assert batches == [N_TRAIN, N_GOOD + N_BAD]
    # Pixel searches per test image: the paper setting once, k=1, k=2, and the random gallery.
    # Level and sigma rows (and the repeated paper row) are derived without searching.
    assert searches == 4 * len(ds.test)


def test_paper_row_equals_full_evaluation(ablation):
    ds, result, _, _ = ablation
    full = evaluate_dataset(ds, lambda: SPADE(**SMALL))
    for group in ("levels", "k", "sigma", "gallery"):
        row = _row(result, group, default=True)
        assert (row.levels, row.k, row.sigma, row.gallery) == ((1, 2, 3), 4, 4.0, "nearest")
        assert row.image_auroc == pytest.approx(full.image_auroc, abs=1e-9)
        assert row.pixel_auroc == pytest.approx(full.pixel_auroc, abs=1e-9)
        assert row.pro == pytest.approx(full.pro, abs=1e-9)
        np.testing.assert_allclose(row.image_scores, full.prediction.image_scores, rtol=1e-12)
        np.testing.assert_allclose(row.maps, full.prediction.anomaly_maps, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("group", "match", "params"),
    [
        ("levels", {"levels": (1,)}, {"levels": (1,)}),
        ("levels", {"levels": (3,)}, {"levels": (3,)}),
        ("k", {"k": 1}, {"k": 1}),
        ("sigma", {"sigma": 0.0}, {"sigma": 0}),
    ],
    ids=["stride4", "stride16", "k1", "sigma0"],
)
def test_derived_rows_equal_full_evaluations(ablation, group, match, params):
    ds, result, _, _ = ablation
    row = _row(result, group, **match)
    full = evaluate_dataset(ds, lambda: SPADE(**{**SMALL, **params}))
    assert row.image_auroc == pytest.approx(full.image_auroc, abs=1e-9)
    assert row.pixel_auroc == pytest.approx(full.pixel_auroc, abs=1e-9)
    assert row.pro == pytest.approx(full.pro, abs=1e-9)
    np.testing.assert_allclose(row.maps, full.prediction.anomaly_maps, rtol=1e-6, atol=1e-7)


def test_random_gallery_differs_and_is_reproducible(ablation):
    ds, result, _, _ = ablation
    nearest = _row(result, "gallery", gallery="nearest")
    rand = _row(result, "gallery", gallery="random")
    assert rand.k == nearest.k == 4 and not rand.default
    # Only the gallery changes: same image scores, different pixel maps.
    np.testing.assert_array_equal(rand.image_scores, nearest.image_scores)
    assert np.abs(rand.maps - nearest.maps).max() > 1e-3
    again = run_ablation(ds, SPADE(**SMALL), seed=0, ks=KS, sigmas=(4,), keep_maps=True)
    np.testing.assert_array_equal(_row(again, "gallery", gallery="random").maps, rand.maps)
    other = run_ablation(ds, SPADE(**SMALL), seed=1, ks=KS, sigmas=(4,), keep_maps=True)
    assert not np.array_equal(_row(other, "gallery", gallery="random").maps, rand.maps)
    # Draws: per test image, distinct training indices, seeded.
    g = random_galleries(7, N_TRAIN, 4, seed=0)
    assert g.shape == (7, 4) and all(len(set(r)) == 4 for r in g.tolist())
    assert g.min() >= 0 and g.max() < N_TRAIN
    np.testing.assert_array_equal(g, random_galleries(7, N_TRAIN, 4, seed=0))


def test_renderings_hold_every_row_and_mark_the_default(ablation):
    _, result, _, _ = ablation
    table, md, d = result.as_table(), result.as_markdown(), result.as_dict()
    assert [r.group for r in result.rows] == ["levels"] * 4 + ["gallery"] * 2 + ["k"] * 3 + ["sigma"] * 4
    for r in result.rows:
        assert r.setting in table and r.setting in md
    # The paper setting is marked once in each group it appears in.
    marked = [line for line in table.splitlines() if line.startswith("* ") and not line.startswith("* base")]
    assert len(marked) == 4 == sum(r.default for r in result.rows)
    assert all(
        line.startswith(f"* {r.setting} ")
        for line, r in zip(marked, [r for r in result.rows if r.default], strict=True)
    )
    assert "* base setting" in table
    assert md.count("\\*") == 4 + 1  # four rows and the footnote
    assert "tables 6 and 7" in table
    rows = json.loads(json.dumps(d))["rows"]
    assert [(x["group"], x["setting"]) for x in rows] == [(r.group, r.setting) for r in result.rows]
    assert sum(x["default"] for x in rows) == 4
    assert all("maps" not in x for x in rows)
    assert d["n_train"] == N_TRAIN and d["n_test"] == N_GOOD + N_BAD and d["k"] == 4


def test_plan_caps_k_and_keeps_the_base_setting():
    plan = _plan(kc=8, sigma=4.0, ks=(1, 5, 10, 50), sigmas=(0, 2, 8), n_train=8)
    assert [label for g, label, _ in plan if g == "k"] == ["k=1", "k=5", "k=8"]
    assert [label for g, label, _ in plan if g == "sigma"] == ["sigma=0", "sigma=2", "sigma=4", "sigma=8"]
    # Four groups show the base setting; it is one configuration.
    base = [
        cfg
        for _, _, cfg in plan
        if cfg.levels == (1, 2, 3) and cfg.k == 8 and cfg.sigma == 4.0 and cfg.gallery == "nearest"
    ]
    assert len(base) == 4 and len(set(base)) == 1


def test_bad_lists_are_refused(tmp_path):
    ds = Dataset("x", train=[tmp_path / "a.png"], test=[])
    with pytest.raises(SpadeError, match="ks"):
        run_ablation(ds, SPADE(**SMALL), ks=(0, 1))
    with pytest.raises(SpadeError, match="sigmas"):
        run_ablation(ds, SPADE(**SMALL), sigmas=(-1,))
