"""Shared fixtures: small synthetic images on disk, and the path of the real datasets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

#: Set (to 1) by .ci/run: there the full datasets must be present, so their absence fails the run
#: instead of skipping the tests that need them.
REQUIRE_DATASETS = os.environ.get("SPADE_AD_REQUIRE_DATASETS", "") not in ("", "0")


def require_dataset(path: Path) -> Path:
    """``path`` if it is a folder. Otherwise skip the calling test with a visible reason (a fresh clone
    has no ../shared/datasets), or fail it when SPADE_AD_REQUIRE_DATASETS is set (CI)."""
    if path.is_dir():
        return path
    message = f"full dataset missing at {path} (see the docs' Getting started: evaluating the full datasets)"
    if REQUIRE_DATASETS:
        pytest.fail(f"{message}; SPADE_AD_REQUIRE_DATASETS is set, so this is a failure, not a skip")
    pytest.skip(message)


def make_image(rng: np.random.Generator, size: int = 48, defect: bool = False) -> np.ndarray:
    """A smooth textured RGB uint8 image; ``defect`` adds a bright square off-centre."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 0.3)
    base = 0.5 + 0.25 * np.sin(2 * np.pi * (3 * xx + phase)) * np.cos(2 * np.pi * 2 * yy)
    img = np.stack([base, base * 0.8 + 0.1, 1 - base], axis=2) + rng.normal(scale=0.02, size=(size, size, 3))
    if defect:
        img[size // 3 : size // 3 + size // 6, size // 2 : size // 2 + size // 6] = [1.0, 1.0, 0.0]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def image_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(train folder with 6 normal PNGs, test folder with 1 normal + 2 defective PNGs)."""
    rng = np.random.default_rng(0)
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir()
    test.mkdir()
    for i in range(6):
        Image.fromarray(make_image(rng)).save(train / f"n{i:02d}.png")
    Image.fromarray(make_image(rng)).save(test / "good_0.png")
    for i in range(2):
        Image.fromarray(make_image(rng, defect=True)).save(test / f"bad_{i}.png")
    return train, test


@pytest.fixture
def toy_mvtec(image_dirs: tuple[Path, Path], tmp_path: Path) -> Path:
    """An MVTec-layout category ``<tmp>/root/toy``: 6 train/good, test/good (1), test/square (2)
    with masks at the square that :func:`make_image` draws (rows 16..24, columns 24..32)."""
    train, test = image_dirs
    cat = tmp_path / "root" / "toy"
    shutil.copytree(train, cat / "train" / "good")
    (cat / "test" / "good").mkdir(parents=True)
    (cat / "test" / "square").mkdir()
    (cat / "ground_truth" / "square").mkdir(parents=True)
    shutil.copy(test / "good_0.png", cat / "test" / "good" / "000.png")
    for i in range(2):
        shutil.copy(test / f"bad_{i}.png", cat / "test" / "square" / f"00{i}.png")
        mask = np.zeros((48, 48), np.uint8)
        mask[16:24, 24:32] = 255
        Image.fromarray(mask).save(cat / "ground_truth" / "square" / f"00{i}_mask.png")
    return cat


@pytest.fixture(autouse=True)
def _one_torch_thread_for_tiny_inputs(request: pytest.FixtureRequest):
    """Unit tests run tiny convolutions, which are far slower with 2 OpenMP threads on a busy 2-core
    machine than with 1; the real-data tests (marked slow) keep the default thread count."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
