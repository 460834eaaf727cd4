"""Accuracy of the paper's settings, of each extra option alone, and of the presets, on real data.

    .venv/bin/python benchmarks/accuracy.py [--datasets transistor,magnetic_tile] [--markdown FILE]

Prints one table per dataset: image AUROC, pixel AUROC, PRO and seconds per test image (features +
search + maps, on this machine) for every row. Every row goes through ``evaluate_dataset``, the same
code as ``spade-ad evaluate``; rows are slow on magnetic_tile (582 test images), so the whole run
takes a while. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from spade_ad import SPADE
from spade_ad.data import load_mvtec
from spade_ad.evaluate import evaluate_dataset
from spade_ad.presets import PRESETS

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATASETS = {"transistor": (DATA / "mvtec_ad", "transistor"), "magnetic_tile": (DATA, "magnetic_tile")}

#: (label, SPADE keyword arguments): the paper, then one option at a time, then the presets.
ROWS: list[tuple[str, dict]] = [
    ("paper settings (SPADE())", {}),
    ("image score: map_max", {"image_score": "map_max"}),
    ("image score: knn*map_max", {"image_score": "knn*map_max"}),
    ("image_k=5 (gallery k=50)", {"image_k": 5}),
    ("patch_size=3", {"patch_size": 3}),
    ("no centre crop (crop_size=256)", {"crop_size": 256}),
    ("levels: stride 16 only", {"levels": (3,)}),
    ("backbone: efficientnet_lite1", {"backbone": "efficientnet_lite1"}),
    ("backbone: efficientnet_lite2", {"backbone": "efficientnet_lite2"}),
] + [(f"preset: {name}", dict(params)) for name, params in PRESETS.items() if name != "paper"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="transistor,magnetic_tile")
    ap.add_argument("--rows", default=None, help="comma-separated row numbers (0-based) to run; default all")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown")
    args = ap.parse_args(argv)
    rows = ROWS if args.rows is None else [ROWS[int(i)] for i in args.rows.split(",")]
    md = []
    for name in args.datasets.split(","):
        root, cat = DATASETS[name]
        ds = load_mvtec(root, cat)
        header = f"{'setting':<34} {'image AUROC':>11} {'pixel AUROC':>11} {'PRO':>7} {'s/img':>6}"
        print(f"\n{name}: {len(ds.train)} train, {len(ds.test)} test images\n{header}\n{'-' * len(header)}", flush=True)
        md += [f"\n**{name}**\n", "| setting | image AUROC | pixel AUROC | PRO | s/img |", "|---|---:|---:|---:|---:|"]
        for label, params in rows:
            t0 = time.perf_counter()
            r = evaluate_dataset(ds, lambda p=params: SPADE(**p))
            s_img = r.predict_seconds / r.n_test
            print(f"{label:<34} {r.image_auroc:>11.4f} {r.pixel_auroc:>11.4f} {r.pro:>7.4f} {s_img:>6.2f}"
                  f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
            md.append(f"| {label} | {r.image_auroc:.4f} | {r.pixel_auroc:.4f} | {r.pro:.4f} | {s_img:.2f} |")
    if args.markdown is not None:
        args.markdown.write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
