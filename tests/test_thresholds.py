"""Thresholds from training or validation data only; predict's decisions, masks and explanations."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from spade_ad import SPADE, SpadeError
from spade_ad.cli import main
from spade_ad.data import load_mvtec
from spade_ad.evaluate import evaluate_dataset
from spade_ad.thresholds import Thresholds, calibrate_thresholds, f1_at, f1_thresholds, split_holdout

SMALL = {"image_size": 48, "crop_size": 48, "k": 2}
CLI_SMALL = ["--image-size", "48", "--crop-size", "48", "--k", "2"]


def test_split_holdout_is_seeded_disjoint_and_sized():
    items = list(range(20))
    keep, hold = split_holdout(items, 0.25)
    assert len(hold) == 5 and len(keep) == 15
    assert sorted(keep + hold) == items and not set(keep) & set(hold)
    assert split_holdout(items, 0.25) == (keep, hold)  # same seed, same split
    assert split_holdout(items, 0.25, seed=1) != (keep, hold)
    with pytest.raises(SpadeError):
        split_holdout(items, 0.01)  # rounds to 0 held out


def test_calibration_quantiles_by_hand():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    maps = np.arange(10, dtype=np.float32).reshape(1, 2, 5)  # 0..9
    th = calibrate_thresholds(scores, maps, image_quantile=0.5, pixel_quantile=0.9)
    # median of 1..5 is 3; 0.9 quantile of 0..9 with linear interpolation: 0.9 * 9 = 8.1
    assert th.image == 3.0 and th.pixel == pytest.approx(8.1)
    assert th.n_images == 5 and "calibration" in th.source


def test_f1_optimal_threshold_by_hand():
    # labels 0,0,1,1 with scores .1,.4,.35,.8. Flag >= .8: P=1, R=.5, F1=.667; >= .4: TP1 FP1, F1=.5;
    # >= .35: TP2 FP1, P=2/3, R=1, F1=.8; >= .1: P=.5, R=1, F1=.667. Best: .35.
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    masks = np.zeros((4, 1, 2), bool)
    masks[2, 0, 0] = masks[3, 0, 1] = True
    maps = np.array([[[0.0, 0.1]], [[0.2, 0.0]], [[0.9, 0.1]], [[0.0, 0.7]]])
    th = f1_thresholds(labels, scores, masks, maps)
    assert th.image == pytest.approx(0.35)
    # pixels: positives 0.9 and 0.7; the next highest negative is 0.2 -> threshold 0.7 gives F1 = 1.
    assert th.pixel == pytest.approx(0.7)
    with pytest.raises(SpadeError, match="both normal and anomalous"):
        f1_thresholds(np.zeros(3), np.ones(3), None, maps[:3])


def test_f1_at_by_hand():
    # TP=1 (idx 0), FP=1 (idx 2), FN=1 (idx 1): F1 = 2/(2+1+1) = 0.5
    assert f1_at(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == 0.5
    assert f1_at(np.array([0, 0]), np.array([0, 0])) == 0.0


def test_evaluate_never_reads_the_test_set_for_thresholds(toy_mvtec, monkeypatch):
    cat = toy_mvtec
    ds = load_mvtec(cat.parent, "toy")
    test_paths = {str(t.path) for t in ds.test}
    calls: list[tuple[set[str], bool]] = []
    real_predict = SPADE.predict

    def spy(self, images):
        names = {str(x) for x in images}
        calls.append((names, getattr(self, "thresholds_", None) is not None))
        return real_predict(self, images)

    monkeypatch.setattr(SPADE, "predict", spy)
    res = evaluate_dataset(ds, lambda: SPADE(**SMALL), calibrate=0.34)
    # Every predict call made before thresholds existed used training images only.
    before = [names for names, have in calls if not have]
    assert before and all(not (names & test_paths) for names in before)
    assert all(names <= {str(p) for p in ds.train} for names in before)
    # ... and the thresholds equal those of fitting on train/good alone (the test folder is irrelevant).
    alone = SPADE(**SMALL).fit(cat / "train" / "good", calibrate=0.34)
    assert res.thresholds == alone.thresholds_
    assert res.n_train == 4 and res.image_f1 is not None and res.pixel_f1 is not None


def test_thresholds_survive_save_and_load(image_dirs, tmp_path):
    train, _ = image_dirs
    m = SPADE(**SMALL).fit(train, calibrate=0.34)
    assert isinstance(m.thresholds_, Thresholds) and len(m.train_paths_) == 4
    m2 = SPADE.load(m.save(tmp_path / "m.safetensors"))
    assert m2.thresholds_ == m.thresholds_


def test_predict_writes_decisions_masks_and_explanations(image_dirs, tmp_path):
    train, test = image_dirs
    runner = CliRunner()
    model = tmp_path / "m.safetensors"
    r = runner.invoke(main, ["fit", str(train), "--out", str(model), "--calibrate", "0.34", *CLI_SMALL])
    assert r.exit_code == 0, r.output
    assert "thresholds: image" in r.output
    out = tmp_path / "pred"
    r = runner.invoke(main, ["predict", str(model), str(test), "--out", str(out), "--explain"])
    assert r.exit_code == 0, r.output
    loaded = SPADE.load(model)
    th = loaded.thresholds_
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "image_score", "is_anomalous"]
    exact = loaded.predict([r["path"] for r in rows]).image_scores  # the CSV rounds to 6 digits
    assert [int(r["is_anomalous"]) for r in rows] == [int(s >= th.image) for s in exact]
    for row in rows:
        stem = Path(row["path"]).stem
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        amap = np.load(out / "maps" / f"{stem}.npy")
        np.testing.assert_array_equal(mask > 0, amap >= th.pixel)
        with open(out / "explain" / f"{stem}_neighbors.csv") as f:
            nb = list(csv.DictReader(f))
        assert [int(x["rank"]) for x in nb] == [1, 2]
        assert all(Path(x["train_path"]).parent == train for x in nb)
        pic = Image.open(out / "explain" / f"{stem}.png")
        assert pic.size == (48 * 2 + 4, 48)


def test_fit_threshold_from_a_validation_folder(image_dirs, tmp_path):
    train, test = image_dirs
    val = tmp_path / "val"
    (val / "good").mkdir(parents=True)
    (val / "square").mkdir()
    shutil.copy(test / "good_0.png", val / "good" / "a.png")
    shutil.copy(test / "bad_0.png", val / "square" / "b.png")
    model = tmp_path / "m.safetensors"
    r = CliRunner().invoke(main, ["fit", str(train), "--out", str(model), "--threshold-from", str(val), *CLI_SMALL])
    assert r.exit_code == 0, r.output
    th = SPADE.load(model).thresholds_
    assert th.source.startswith("validation") and th.pixel is None  # no masks given: no pixel threshold
    pred = SPADE.load(model).predict([val / "good" / "a.png", val / "square" / "b.png"])
    assert pred.is_anomalous.tolist() == [False, True]


def test_calibrate_and_threshold_from_together_is_a_usage_error(image_dirs, tmp_path):
    train, _ = image_dirs
    r = CliRunner().invoke(
        main,
        [
            "fit",
            str(train),
            "--out",
            str(tmp_path / "m"),
            "--calibrate",
            "0.3",
            "--threshold-from",
            str(tmp_path),
            *CLI_SMALL,
        ],
    )
    assert r.exit_code == 2 and "either" in r.output
