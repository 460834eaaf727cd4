"""What a new user meets first: the bundled sample, `spade-ad demo`, predict over sub-folders,
image-level datasets, run names, and how the full-dataset tests behave when the datasets are absent."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_dataset

from spade_ad import SPADE
from spade_ad.cli import main
from spade_ad.datasets import load_sample, sample_path

SMALL = ["--image-size", "48", "--crop-size", "48", "--k", "2"]


def _cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------------------------
# the bundled sample
# --------------------------------------------------------------------------------------------
def test_sample_is_complete_and_byte_identical_to_its_manifest():
    root = sample_path()
    ds = load_sample()
    assert ds.name == "transistor" and len(ds.train) == 60
    counts: dict[str, int] = {}
    for t in ds.test:
        counts[t.defect] = counts.get(t.defect, 0) + 1
        assert (t.mask is not None) == (t.label == 1)
    assert counts == {"good": 10, "bent_lead": 5, "cut_lead": 5, "damaged_case": 5, "misplaced": 5}
    with open(root / "MANIFEST.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60 + 30 + 20  # train, test images, masks
    for row in rows:
        assert hashlib.sha256((root / row["path"]).read_bytes()).hexdigest() == row["sha256"], row["path"]
    # The licence travels with the data, and says it is not the code's.
    assert "Attribution-NonCommercial-ShareAlike 4.0" in (root / "license.txt").read_text()
    assert "CC BY-NC-SA 4.0" in (root / "README.md").read_text()
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 8_000_000


@pytest.mark.slow
def test_demo_fits_scores_and_reports_on_the_bundled_sample(tmp_path):
    """`spade-ad demo` as the README runs it: real embedded weights, the real pipeline, floors measured
    on the sample (2026-11-30: image 0.8750, pixel 0.8769, PRO 0.7839 with the paper's settings)."""
    exe = Path(sys.executable).with_name("spade-ad")
    out = tmp_path / "demo"
    cmd = [str(exe), "demo", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())["transistor"]
    assert (res["n_train"], res["n_test"]) == (60, 30)
    assert res["image_auroc"] >= 0.85 and res["pixel_auroc"] >= 0.85 and res["pro"] >= 0.75, res
    # The printed table carries the same figures, and the last line says where the report is.
    assert f"{res['image_auroc']:.4f}" in proc.stdout and f"{res['pro']:.4f}" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == f"report: {out / 'report' / 'index.html'}"
    assert "<table" in (out / "report" / "index.html").read_text()
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(overlays) == 30 and "bent_lead_000.png" in overlays and "good_000.png" in overlays
    # The saved model is the one that was evaluated: it reproduces the reported ranking.
    model = SPADE.load(out / "model.spade")
    assert len(model.train_paths_) == 60
    # A second run does not overwrite the first one unless asked.
    before = (out / "results.json").read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 2 and str(out) in again.stderr and "--overwrite" in again.stderr
    assert (out / "results.json").read_bytes() == before


# --------------------------------------------------------------------------------------------
# predict walks sub-folders
# --------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_model(toy_mvtec: Path, tmp_path: Path) -> Path:
    model = tmp_path / "m.spade"
    r = _cli("fit", toy_mvtec, "--out", model, *SMALL)
    assert r.exit_code == 0, r.output
    return model


def test_predict_walks_sub_folders_with_unique_output_names(toy_mvtec, tiny_model, tmp_path):
    # test/good/000.png, test/square/000.png, test/square/001.png: one folder given, three images found
    out = tmp_path / "pred"
    r = _cli("predict", tiny_model, toy_mvtec / "test", "--out", out)
    assert r.exit_code == 0, r.output
    with open(out / "scores.csv") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    assert sorted(Path(p).relative_to(toy_mvtec / "test").as_posix() for p in paths) == [
        "good/000.png",
        "square/000.png",
        "square/001.png",
    ]
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["good_000.npy", "square_000.npy", "square_001.npy"]
    # (to float32 rounding: a batch of one image runs the backbone on other batch shapes than three)
    np.testing.assert_allclose(
        np.load(out / "maps" / "square_001.npy"),
        SPADE.load(tiny_model).predict([toy_mvtec / "test" / "square" / "001.png"]).anomaly_maps[0],
        rtol=1e-5,
    )


def test_predict_no_recursive_keeps_the_old_behaviour(toy_mvtec, tiny_model, tmp_path):
    r = _cli("predict", tiny_model, toy_mvtec / "test", "--out", tmp_path / "pred", "--no-recursive")
    assert r.exit_code == 2 and "contains no images" in r.output and str(toy_mvtec / "test") in r.output
    assert not (tmp_path / "pred").exists()


def test_predict_skips_hidden_folders(toy_mvtec, tiny_model, tmp_path):
    hidden = toy_mvtec / "test" / ".thumbnails"
    hidden.mkdir()
    shutil.copy(toy_mvtec / "test" / "good" / "000.png", hidden / "zzz.png")
    r = _cli("predict", tiny_model, toy_mvtec / "test", "--out", tmp_path / "pred")
    assert r.exit_code == 0, r.output
    assert "zzz" not in (tmp_path / "pred" / "scores.csv").read_text()


# --------------------------------------------------------------------------------------------
# image-level datasets and run names
# --------------------------------------------------------------------------------------------
def test_evaluate_image_level_dataset_reports_pixel_metrics_as_na(toy_mvtec, tmp_path):
    shutil.rmtree(toy_mvtec / "ground_truth")
    js = tmp_path / "r.json"
    r = _cli("evaluate", toy_mvtec.parent, "--category", "toy", "--json", js, *SMALL)
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())["toy"]
    assert res["pixel_auroc"] is None and res["pro"] is None
    assert res["image_auroc"] == 1.0  # the bright squares are far from every training image
    row = next(line for line in r.stdout.splitlines() if line.startswith("toy "))
    assert row.split()[1:4] == ["1.0000", "n/a", "n/a"]
    assert "no ground-truth masks" in r.stdout


def test_evaluate_folders_are_named_by_name_or_by_their_product_folder(toy_mvtec, tmp_path):
    base = ["--train", toy_mvtec / "train" / "good", "--test-good", toy_mvtec / "test" / "good"]
    base += ["--test-anomalous", toy_mvtec / "test" / "square", *SMALL]
    js = tmp_path / "a.json"
    assert _cli("evaluate", *base, "--json", js).exit_code == 0
    # toy/train/good: "good" and "train" say what the folder holds; "toy" is the product
    assert "toy" in json.loads(js.read_text())
    js2 = tmp_path / "b.json"
    assert _cli("evaluate", *base, "--name", "line-3", "--json", js2).exit_code == 0
    assert "line-3" in json.loads(js2.read_text())
    r = _cli("evaluate", toy_mvtec.parent, "--category", "toy", "--name", "x", *SMALL)
    assert r.exit_code == 2 and "--name" in r.output


# --------------------------------------------------------------------------------------------
# the full datasets: skipped with a reason on a fresh clone, a failure in CI
# --------------------------------------------------------------------------------------------
def test_missing_dataset_skips_visibly_or_fails_when_required(tmp_path, monkeypatch):
    import conftest

    missing = tmp_path / "no-such-datasets"
    monkeypatch.setattr(conftest, "REQUIRE_DATASETS", False)
    with pytest.raises(pytest.skip.Exception, match=r"full dataset missing at .*no-such-datasets"):
        require_dataset(missing)
    monkeypatch.setattr(conftest, "REQUIRE_DATASETS", True)
    with pytest.raises(pytest.fail.Exception, match="SPADE_AD_REQUIRE_DATASETS"):
        require_dataset(missing)
    assert require_dataset(tmp_path) == tmp_path
