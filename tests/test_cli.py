"""The command line: fit -> predict outputs, evaluate JSON, help and version."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from spade_ad import SPADE
from spade_ad.cli import main

SMALL = ["--image-size", "48", "--crop-size", "48", "--k", "2"]


def test_fit_then_predict_writes_scores_maps_overlays(image_dirs, tmp_path):
    train, test = image_dirs
    runner = CliRunner()
    model = tmp_path / "m.safetensors"
    r = runner.invoke(main, ["fit", str(train), "--out", str(model), *SMALL])
    assert r.exit_code == 0, r.output
    assert model.is_file()
    out = tmp_path / "pred"
    r = runner.invoke(main, ["predict", str(model), str(test), "--out", str(out)])
    assert r.exit_code == 0, r.output
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == ["path", "image_score"]
    assert sorted(Path(r["path"]).name for r in rows) == ["bad_0.png", "bad_1.png", "good_0.png"]
    # Same numbers as the library.
    api = SPADE.load(model).predict([r["path"] for r in rows])
    np.testing.assert_allclose([float(r["image_score"]) for r in rows], api.image_scores, rtol=1e-5)
    for row, amap in zip(rows, api.anomaly_maps, strict=True):
        stem = Path(row["path"]).stem
        saved = np.load(out / "maps" / f"{stem}.npy")
        assert saved.dtype == np.float32 and saved.shape == (48, 48)
        np.testing.assert_array_equal(saved, amap)
        overlay = Image.open(out / "overlays" / f"{stem}.png")
        assert overlay.size == (48, 48) and overlay.mode == "RGB"
    # Nothing temporary left beside the outputs.
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fit_uses_train_good_of_an_mvtec_category(image_dirs, tmp_path):
    train, _ = image_dirs
    cat = tmp_path / "cat"
    shutil.copytree(train, cat / "train" / "good")
    model = tmp_path / "m.safetensors"
    r = CliRunner().invoke(main, ["fit", str(cat), "--out", str(model), *SMALL])
    assert r.exit_code == 0, r.output
    assert len(SPADE.load(model).train_paths_) == 6


def test_predict_names_outputs_by_folder_when_stems_collide(image_dirs, tmp_path):
    train, test = image_dirs
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(test / "good_0.png", other / "good_0.png")
    model = tmp_path / "m.safetensors"
    runner = CliRunner()
    assert runner.invoke(main, ["fit", str(train), "--out", str(model), *SMALL]).exit_code == 0
    out = tmp_path / "pred"
    r = runner.invoke(
        main,
        [
            "predict",
            str(model),
            str(test / "good_0.png"),
            str(other / "good_0.png"),
            "--out",
            str(out),
            "--no-overlays",
        ],
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["other_good_0.npy", "test_good_0.npy"]
    assert not (out / "overlays").exists()


def test_evaluate_json_on_a_small_mvtec_layout(toy_mvtec, tmp_path):
    root = toy_mvtec.parent
    js = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["evaluate", str(root), "--category", "all", "--json", str(js), *SMALL])
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    assert set(data) == {"toy", "mean", "config"}
    rec = data["toy"]
    assert {"image_auroc", "pixel_auroc", "pro", "n_train", "n_test", "seconds"} <= set(rec)
    assert (rec["n_train"], rec["n_test"]) == (6, 3)
    assert rec["image_auroc"] == 1.0  # both squares score above the normal image
    assert rec["pixel_auroc"] > 0.9
    assert data["config"]["k"] == 2 and data["config"]["backbone"] == "efficientnet_lite0"
    assert "toy" in r.output and "image AUROC" in r.output
    # A second run refuses to overwrite the JSON unless asked.
    r2 = CliRunner().invoke(main, ["evaluate", str(root), "--category", "toy", "--json", str(js), *SMALL])
    assert r2.exit_code == 2 and "--overwrite" in r2.output


def test_help_and_version():
    runner = CliRunner()
    r = runner.invoke(main, ["--help"])
    assert r.exit_code == 0 and all(c in r.output for c in ("fit", "predict", "evaluate"))
    r = runner.invoke(main, ["--version"])
    assert r.exit_code == 0 and "0.1.0" in r.output


def test_bad_levels_option_is_a_usage_error(image_dirs, tmp_path):
    train, _ = image_dirs
    r = CliRunner().invoke(main, ["fit", str(train), "--out", str(tmp_path / "m"), "--levels", "1,4"])
    assert r.exit_code == 2 and "levels" in r.output


def test_evaluate_plain_folders_with_masks_matched_by_stem(image_dirs, tmp_path):
    train, test = image_dirs
    good, bad, masks = tmp_path / "g", tmp_path / "b", tmp_path / "m"
    for d in (good, bad, masks):
        d.mkdir()
    shutil.copy(test / "good_0.png", good / "ok.png")
    for i in range(2):
        shutil.copy(test / f"bad_{i}.png", bad / f"x{i}.png")
        mask = np.zeros((48, 48), np.uint8)
        mask[16:24, 24:32] = 255
        # one mask named like its image, one with the MVTec _mask suffix
        Image.fromarray(mask).save(masks / (f"x{i}.png" if i == 0 else f"x{i}_mask.png"))
    js = tmp_path / "r.json"
    r = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--train",
            str(train),
            "--test-good",
            str(good),
            "--test-anomalous",
            str(bad),
            "--masks",
            str(masks),
            "--json",
            str(js),
            *SMALL,
        ],
    )
    assert r.exit_code == 0, r.output
    # named by the folder above "train" (a folder name that only says what it holds)
    rec = json.loads(js.read_text())[tmp_path.name]
    assert (rec["n_train"], rec["n_test"], rec["image_auroc"]) == (6, 3, 1.0)
    assert rec["pixel_auroc"] > 0.9 and rec["pro"] is not None


def test_evaluate_needs_a_layout():
    r = CliRunner().invoke(main, ["evaluate"])
    assert r.exit_code == 2 and "--category" in r.output


def test_ablate_prints_and_writes_the_table(toy_mvtec, tmp_path):
    root = toy_mvtec.parent
    js, md = tmp_path / "a.json", tmp_path / "a.md"
    r = CliRunner().invoke(
        main, ["ablate", str(root), "--category", "toy", "--json", str(js), "--markdown", str(md), *SMALL]
    )
    assert r.exit_code == 0, r.output
    assert "stride 4" in r.output and "sigma" in r.output.lower()
    data = json.loads(js.read_text())
    settings = [row["setting"] for row in data["rows"]]
    assert len(settings) >= 12 and any("random" in s.lower() for s in settings)
    assert "|" in md.read_text()
