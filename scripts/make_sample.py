"""Build the bundled sample (src/spade_ad/datasets/mvtec_sample) from the full MVTec AD transistor category.

Run once by the maintainers (the full data is not shipped):
    python scripts/make_sample.py ../shared/datasets/mvtec_ad

It copies, byte for byte, an evenly spaced selection: 60 of train/good, 10 of test/good and 5 of each
defect type with their masks, keeping the original file names, and writes MANIFEST.csv (path, sha256).
"""

from __future__ import annotations

import csv
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "src" / "spade_ad" / "datasets" / "mvtec_sample"
COUNTS = {"train/good": 60, "test/good": 10}
PER_DEFECT = 5


def evenly(files: list[Path], n: int) -> list[Path]:
    """``n`` files spread evenly over the sorted list (first and last included)."""
    idx = np.unique(np.round(np.linspace(0, len(files) - 1, n)).astype(int))
    return [files[i] for i in idx]


def main(root: Path) -> None:
    src = root / "transistor"
    dst = OUT / "transistor"
    if dst.exists():
        shutil.rmtree(dst)
    picked: list[tuple[Path, Path]] = []
    for sub, n in COUNTS.items():
        picked += [(p, dst / sub / p.name) for p in evenly(sorted((src / sub).glob("*.png")), n)]
    for defect in sorted(d.name for d in (src / "test").iterdir() if d.is_dir() and d.name != "good"):
        for p in evenly(sorted((src / "test" / defect).glob("*.png")), PER_DEFECT):
            picked.append((p, dst / "test" / defect / p.name))
            mask = src / "ground_truth" / defect / f"{p.stem}_mask.png"
            picked.append((mask, dst / "ground_truth" / defect / mask.name))
    rows = []
    for a, b in picked:
        b.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(a, b)
        rows.append([b.relative_to(OUT).as_posix(), hashlib.sha256(b.read_bytes()).hexdigest()])
    shutil.copyfile(src / "license.txt", OUT / "license.txt")
    with open(OUT / "MANIFEST.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "sha256"], *rows])
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{len(rows)} files, {size / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets/mvtec_ad"))
