"""Accuracy on the real data in ../shared/datasets, with the real embedded weights (nothing mocked).

These run the whole pipeline: the transistor run is the Core acceptance check (paper defaults,
embedded backbone); the magnetic_tile run covers greyscale images of every size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATASETS, require_dataset  # tests/ is on sys.path (pytest rootdir conftest)

from spade_ad import SPADE
from spade_ad.data import load_mvtec
from spade_ad.evaluate import load_masks
from spade_ad.metrics import image_auroc, pixel_auroc, pro_auc

pytestmark = pytest.mark.slow


def test_transistor_paper_defaults_reach_the_bar(tmp_path):
    root = require_dataset(DATASETS / "mvtec_ad")
    exe = Path(sys.executable).with_name("spade-ad")
    cmd = [
        str(exe) if exe.exists() else "spade-ad",
        "evaluate",
        str(root),
        "--category",
        "transistor",
        "--json",
        str(tmp_path / "r.json"),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    t = res["transistor"]
    print(f"transistor: image {t['image_auroc']:.4f} pixel {t['pixel_auroc']:.4f} PRO {t['pro']:.4f}")
    assert (t["n_train"], t["n_test"]) == (213, 100)
    assert t["image_auroc"] >= 0.88
    assert t["pixel_auroc"] >= 0.88
    assert t["pro"] >= 0.78
    cfg = res["config"]
    assert (cfg["backbone"], cfg["k"], cfg["kappa"], cfg["levels"], cfg["sigma"]) == (
        "efficientnet_lite0",
        50,
        1,
        [1, 2, 3],
        4.0,
    )
    assert "transistor" in proc.stdout and "PRO" in proc.stdout


def _magnetic_subset_figures(preset: str, tmp_path: Path) -> tuple[float, float, float]:
    """Fit the preset on a stratified subset of magnetic_tile (every 4th training image, every 3rd test
    image, to keep the suite short), save, reload, predict; (image AUROC, pixel AUROC, PRO)."""
    ds = load_mvtec(require_dataset(DATASETS), "magnetic_tile")
    assert len(ds.train) == 762 and len(ds.test) == 582
    ds.train = ds.train[::4]
    ds.test = ds.test[::3]
    model = SPADE.from_preset(preset).fit(ds.train)
    pred = SPADE.load(model.save(tmp_path / f"{preset}.safetensors")).predict([t.path for t in ds.test])
    labels = np.array([t.label for t in ds.test])
    masks = load_masks(ds, model.image_size, model.crop_size)  # masks prepared like the images
    assert pred.anomaly_maps.shape == (len(ds.test), model.crop_size, model.crop_size)
    assert np.isfinite(pred.anomaly_maps).all() and np.isfinite(pred.image_scores).all()
    figures = (
        image_auroc(labels, pred.image_scores),
        pixel_auroc(masks, pred.anomaly_maps),
        pro_auc(masks, pred.anomaly_maps),
    )
    print(f"magnetic_tile subset, preset {preset}: image {figures[0]:.4f} pixel {figures[1]:.4f} PRO {figures[2]:.4f}")
    return figures


@pytest.fixture(scope="module")
def paper_on_magnetic_subset(tmp_path_factory) -> tuple[float, float, float]:
    return _magnetic_subset_figures("paper", tmp_path_factory.mktemp("mt_paper"))


def test_magnetic_tile_greyscale_variable_sizes(paper_on_magnetic_subset):
    """Paper settings on greyscale images of every size (full-category figures in the README)."""
    img, pix, pro = paper_on_magnetic_subset
    # Well above chance on a hard category.
    assert img >= 0.72 and pix >= 0.70 and pro >= 0.72


def test_accurate_preset_beats_the_paper_on_magnetic_tile_subset(paper_on_magnetic_subset, tmp_path):
    """The ``accurate`` preset (320 -> 280, joint levels with 3x3 / 5x5 averaging) against the paper on
    the same subset, through save and load."""
    img, pix, pro = _magnetic_subset_figures("accurate", tmp_path)
    paper_img, paper_pix, _ = paper_on_magnetic_subset
    # Measured on this subset 2026-11-30: image 0.857, pixel 0.854, PRO 0.781, against the paper
    # settings' 0.760 / 0.753 / 0.774 and accurate-v1's 0.857 / 0.856 / 0.769 (docs/patchcore.md).
    # Clearly better image and pixel AUROC than the paper; the PRO floor is above accurate-v1's, which
    # is what the 2026-11-30 change was for. The absolute image floor is lower than the full category's
    # 0.958: a quarter of the training set holds fewer near-copies of the good test tiles (the split
    # leak docs/accuracy.md describes), so good images score higher here.
    assert img >= 0.84 and img >= paper_img + 0.05
    assert pix >= 0.83 and pix >= paper_pix + 0.03
    assert pro >= 0.772


def _transistor_preset_via_cli(preset: str, tmp_path: Path) -> dict:
    """``spade-ad evaluate`` with a preset on the full transistor category; its JSON document."""
    root = require_dataset(DATASETS / "mvtec_ad")
    exe = Path(sys.executable).with_name("spade-ad")
    cmd = [
        str(exe) if exe.exists() else "spade-ad",
        "evaluate",
        str(root),
        "--category",
        "transistor",
        "--preset",
        preset,
        "--json",
        str(tmp_path / "r.json"),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    t = res["transistor"]
    print(f"transistor, preset {preset}: image {t['image_auroc']:.4f} pixel {t['pixel_auroc']:.4f} PRO {t['pro']:.4f}")
    return res


def test_accurate_preset_on_transistor(tmp_path):
    """The ``accurate`` preset through the command line, on the full transistor category."""
    res = _transistor_preset_via_cli("accurate", tmp_path)
    t = res["transistor"]
    # Measured 2026-11-30: 0.9808 / 0.9781 / 0.9330 (docs/patchcore.md). The image and PRO floors are
    # above accurate-v1's 0.9708 / 0.9210, the gain the 2026-11-30 change was made for.
    assert t["image_auroc"] >= 0.975 and t["pixel_auroc"] >= 0.97 and t["pro"] >= 0.926
    cfg = res["config"]
    assert (cfg["joint_levels"], cfg["patch_size"], cfg["precision"]) == (True, [3, 5], "bf16")


def test_joint_coreset_preset_beats_the_paper_on_magnetic_tile_subset(paper_on_magnetic_subset, tmp_path):
    """The ``joint-coreset`` preset (320 -> 280, joint levels, a 10 % coreset of every training image's
    positions) against the paper on the same subset, through save and load."""
    img, pix, pro = _magnetic_subset_figures("joint-coreset", tmp_path)
    paper_img, paper_pix, _ = paper_on_magnetic_subset
    # Floors a little under the figures measured on this subset (2026-11-30): image 0.865, pixel 0.856,
    # PRO 0.760, against the paper settings' 0.760 / 0.753 / 0.774 (docs/patchcore.md). The absolute image
    # floor is lower than on the full category: a quarter of the training set holds fewer near-copies of
    # the good test tiles, so good images score higher here.
    assert img >= 0.84 and img >= paper_img + 0.05
    assert pix >= 0.83 and pix >= paper_pix + 0.03
    assert pro >= 0.74


def test_joint_coreset_preset_on_transistor(tmp_path):
    """The ``joint-coreset`` preset (joint levels, 10 % coreset) through the command line, on the full
    transistor category."""
    res = _transistor_preset_via_cli("joint-coreset", tmp_path)
    t = res["transistor"]
    # Floors a little under the figures measured (docs/patchcore.md, 2026-11-30: 0.986 / 0.979 / 0.928);
    # the image floor is above accurate-v1's 0.971 (its pixel AUROC and PRO: 0.978 / 0.921).
    assert t["image_auroc"] >= 0.975 and t["pixel_auroc"] >= 0.97 and t["pro"] >= 0.92
    cfg = res["config"]
    assert (cfg["joint_levels"], cfg["gallery"], cfg["coreset"]) == (True, "all", 0.1)
