"""Small datasets that ship with spade-ad, in the way scikit-learn ships its ``load_*`` datasets.

The one sample is a subset of MVTec AD *transistor* at 256x256 (60 normal training images, 10 normal
and 20 defective test images with masks). Its licence is CC BY-NC-SA 4.0, not the code's Apache-2.0:
see ``sample_path() / "README.md"``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..data import Dataset, load_mvtec

__all__ = ["SAMPLE_CATEGORY", "load_sample", "sample_path"]

#: The category folder inside :func:`sample_path`.
SAMPLE_CATEGORY = "transistor"


def sample_path() -> Path:
    """Root folder of the bundled sample, in MVTec layout: ``sample_path() / "transistor" / "train" / "good"``...

    Use it wherever a dataset root is expected, e.g. ``spade-ad evaluate $(python -c ...) --category transistor``.
    """
    # The package is installed as plain files (wheel or editable), so the resource is a real folder.
    root = Path(str(resources.files(__name__) / "mvtec_sample"))
    if not (root / SAMPLE_CATEGORY / "train" / "good").is_dir():
        raise FileNotFoundError(f"{root}: the bundled sample is missing from this installation of spade-ad")
    return root


def load_sample() -> Dataset:
    """The bundled sample as a :class:`spade_ad.data.Dataset` (training paths, labelled test items with masks)."""
    return load_mvtec(sample_path(), SAMPLE_CATEGORY)
