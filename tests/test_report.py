"""The HTML evaluation report: files, table, links, gallery order, and a real render in headless Chromium."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image  # tests/ is on sys.path (pytest rootdir conftest)
from PIL import Image

from spade_ad import SPADE, SpadeError
from spade_ad.data import load_mvtec
from spade_ad.evaluate import CategoryResult, evaluate_dataset
from spade_ad.report import PAPER_LABEL, gallery_order, write_report

CHROMIUM = Path("/usr/bin/chromium")
SMALL = {"image_size": 48, "crop_size": 48, "k": 2}
CONFIG = {"backbone": "efficientnet_lite0", "k": 2, "note": "<b>escaped & safe</b>"}


def _toy_mvtec(root: Path) -> Path:
    """MVTec layout: 8 normal training images; test: 3 normal, 3 with a bright square (masks given)."""
    rng = np.random.default_rng(0)
    cat = root / "toy"
    for d in ("train/good", "test/good", "test/square", "ground_truth/square"):
        (cat / d).mkdir(parents=True)
    for i in range(8):
        Image.fromarray(make_image(rng)).save(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(3):
        Image.fromarray(make_image(rng)).save(cat / "test" / "good" / f"{i:03d}.png")
        Image.fromarray(make_image(rng, defect=True)).save(cat / "test" / "square" / f"{i:03d}.png")
        mask = np.zeros((48, 48), np.uint8)
        mask[16:24, 24:32] = 255  # where make_image puts the square
        Image.fromarray(mask).save(cat / "ground_truth" / "square" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> CategoryResult:
    root = _toy_mvtec(tmp_path_factory.mktemp("data"))
    return evaluate_dataset(load_mvtec(root, "toy"), lambda: SPADE(**SMALL), calibrate=0.25)


@pytest.fixture(scope="module")
def report(result: CategoryResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report([result], tmp_path_factory.mktemp("out") / "report", CONFIG, gallery_per_category=5)


def _gallery_indices(page: str) -> list[int]:
    return [int(x) for x in re.findall(r'data-test-index="(\d+)"', page)]


def test_report_files_table_links_and_order(result: CategoryResult, report: Path):
    assert result.thresholds is not None and result.thresholds.pixel is not None
    for name in ("index.html", "summary.md", "report.json"):
        assert (report / name).is_file()
    assert not list(report.parent.glob(".report.*"))  # the staging folder was renamed away
    page = (report / "index.html").read_text()
    data = json.loads((report / "report.json").read_text())
    t = data["toy"]

    # The table row of the category shows the JSON's numbers, formatted to 4 decimals.
    row = re.search(r'<tr class="cat" data-category="toy">(.*?)</tr>', page, re.DOTALL).group(1)
    for key in ("image_auroc", "pixel_auroc", "pro", "image_f1", "pixel_f1", "seconds_per_test_image"):
        assert f">{t[key]:.4f}<" in row, key
    assert f">{t['n_train']}<" in row and f">{t['n_test']}<" in row and "calibration" in row
    assert PAPER_LABEL in page and "0.855" in page and "0.960" in page and "0.917" in page
    assert "could not be verified offline" in page and "efficientnet_lite0" in page

    # Self-contained: every picture is a local file, nothing from the network, no script, text escaped.
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and all((report / s).is_file() for s in srcs)
    assert not re.search(r"https?://", page) and "<script" not in page
    assert "&lt;b&gt;escaped &amp; safe&lt;/b&gt;" in page and "<b>escaped" not in page
    assert {"img/roc_image.png", "img/roc_pixel.png", "img/pro.png"} <= set(srcs)

    # Gallery: limited to 5 of the 6 test images, worst first by the documented threshold rule.
    scores, labels, thr = result.prediction.image_scores, result.labels, result.thresholds.image
    margin = np.where(labels == 1, thr - scores, scores - thr)
    expected = sorted(range(len(scores)), key=lambda i: (-margin[i], i))[:5]
    assert _gallery_indices(page) == expected
    badness = [float(x) for x in re.findall(r'data-badness="([^"]+)"', page)]
    assert badness == sorted(badness, reverse=True)
    assert page.count("nearest normal #") == 5 * 2  # k=2 neighbours per entry
    assert page.count("rebuilt from its matched normal patches") == 5
    assert "thresholded outline" in page and "ground truth mask" in page

    md = (report / "summary.md").read_text()
    assert "| category | image AUROC | pixel AUROC | PRO |" in md
    assert re.search(rf"\| toy \| {t['image_auroc']:.4f} \| {t['pixel_auroc']:.4f} \| {t['pro']:.4f} \|", md)
    assert PAPER_LABEL in md and '"backbone": "efficientnet_lite0"' in md


def test_without_thresholds_rank_rule_and_no_threshold_note(result: CategoryResult, tmp_path: Path):
    bare = dataclasses.replace(result, thresholds=None, image_f1=None, pixel_f1=None)
    odd = dataclasses.replace(bare, category="toy <2> & co")  # a second category, with a name to escape
    out = write_report([bare, odd], tmp_path / "r", CONFIG, gallery_per_category=3)
    page = (out / "index.html").read_text()
    assert "no threshold" in page and "image F1" not in page
    assert "toy &lt;2&gt; &amp; co" in page and "toy <2>" not in page
    assert '<tr class="mean">' in page and page.count("worst first (by rank, no threshold)") == 2
    assert (out / "img" / "c01").is_dir() and len(_gallery_indices(page)) == 6
    # Rank rule: anomalous images with the lowest scores / normal images with the highest come first.
    order = gallery_order(np.array([1.0, 5.0, 2.0, 4.0]), np.array([0, 0, 1, 1]), None)
    assert order.rule == "rank" and order.indices.tolist() == [1, 2, 3, 0]
    expected = gallery_order(result.prediction.image_scores, result.labels, None).indices[:3].tolist()
    assert _gallery_indices(page)[:3] == expected
    # An existing report is not replaced without overwrite, and is replaced with it.
    with pytest.raises(SpadeError, match="overwrite"):
        write_report([bare], out, CONFIG)
    write_report([bare], out, CONFIG, overwrite=True, gallery_per_category=1)
    assert len(_gallery_indices((out / "index.html").read_text())) == 1


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    profile = cwd / "profile"  # a fresh profile per run: no state from other runs
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=cwd)


def _gallery_colours(png: Path) -> int:
    """Distinct colours in the screenshot below the magenta bar that marks the gallery's start."""
    shot = np.asarray(Image.open(png).convert("RGB"))
    magenta = (shot == [255, 0, 255]).all(axis=2).sum(axis=1) > shot.shape[1] // 2
    rows = np.flatnonzero(magenta)
    assert rows.size, "gallery marker not visible in the screenshot"
    region = shot[rows[-1] + 1 :].reshape(-1, 3)
    return len(np.unique(region, axis=0))


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: run scripts/install_browser.sh (as root) to install headless Chromium")
    url = (report / "index.html").resolve().as_uri()
    dom = _chromium("--dump-dom", url, cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<table id="results">' in dom.stdout and 'data-category="toy"' in dom.stdout
    assert PAPER_LABEL in dom.stdout and dom.stdout.count('class="entry"') == 5

    shot = tmp_path / "shot.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=1400,3000", url, cwd=tmp_path)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    loaded = _gallery_colours(shot)

    # Control: the same page with its pictures missing renders only text and broken-image boxes,
    # so the colour count separates "images loaded" from "images failed".
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.html").write_text((report / "index.html").read_text())
    shot2 = tmp_path / "shot2.png"
    r = _chromium(f"--screenshot={shot2}", "--window-size=1400,3000", (broken / "index.html").as_uri(), cwd=tmp_path)
    assert r.returncode == 0 and shot2.is_file(), r.stderr[-2000:]
    missing = _gallery_colours(shot2)
    assert loaded > 2000 and loaded > 4 * missing, (loaded, missing)
