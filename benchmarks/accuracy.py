"""Accuracy of the paper's settings, of each extra option alone, and of the presets, on real data.

    .venv/bin/python benchmarks/accuracy.py [--datasets transistor,magnetic_tile] [--markdown FILE]

Prints one table per dataset: image AUROC, pixel AUROC, PRO and seconds per test image for every
row. Rows that differ only in how maps are combined or images are scored (image score, image_k,
pyramid levels) share one feature extraction and one search per level, exactly as separate runs
would compute them; their seconds are what such a run costs per test image: features, plus the
search of the levels the row uses, plus smoothing. ``tests/test_real_data.py`` checks the preset
against a plain ``spade-ad evaluate`` path. Not part of the test suite: transistor takes about
8 minutes on 2 cores, magnetic_tile about an hour (``--rows`` runs a subset of the rows).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from spade_ad import SPADE
from spade_ad.data import load_mvtec
from spade_ad.evaluate import load_masks
from spade_ad.maps import combine_levels, smooth
from spade_ad.metrics import image_auroc, pixel_auroc, pro_auc
from spade_ad.presets import PRESETS

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATASETS = {"transistor": (DATA / "mvtec_ad", "transistor"), "magnetic_tile": (DATA, "magnetic_tile")}

#: (label, SPADE keyword arguments): the paper, then one option at a time, then the non-paper presets.
ROWS: list[tuple[str, dict[str, Any]]] = [
    ("paper settings (SPADE())", {}),
    ("image score: map_max", {"image_score": "map_max"}),
    ("image score: knn*map_max", {"image_score": "knn*map_max"}),
    ("image_k=5 (gallery k=50)", {"image_k": 5}),
    ("levels: strides 8, 16", {"levels": (2, 3)}),
    ("levels: stride 16 only", {"levels": (3,)}),
    ("patch_size=3", {"patch_size": 3}),
    ("resolution 320, crop 280, sigma 5", {"image_size": 320, "crop_size": 280, "sigma": 5.0}),
    ("no centre crop (crop_size=256)", {"crop_size": 256}),
    ("geometry: pad, no crop", {"geometry": "pad", "crop_size": 256}),
    ("window search R=2", {"window": 2}),
    ("backbone: efficientnet_lite1", {"backbone": "efficientnet_lite1"}),
    ("backbone: efficientnet_lite2", {"backbone": "efficientnet_lite2"}),
    # The accurate preset as first chosen (2026-11-28), before the resolution change: for comparison.
    (
        "accurate at 256/224, patch_size=3",
        {"patch_size": 3, "levels": (2, 3), "image_score": "knn*map_max", "image_k": 5},
    ),
] + [(f"preset: {name}", dict(params)) for name, params in PRESETS.items() if name != "paper"]

# Settings that change the features themselves; rows agreeing on these share one extraction.
FEATURE_KEYS = ("backbone", "image_size", "crop_size", "patch_size", "geometry")


def run_group(ds, models: list[tuple[str, SPADE]]) -> list[dict[str, Any]]:
    """Evaluate models that share their features: extract once (all three levels), search each level once."""
    first = models[0][1]
    base = SPADE(
        backbone=first.backbone,
        image_size=first.image_size,
        crop_size=first.crop_size,
        patch_size=first.patch_size,
        geometry=first.geometry,
        k=max(m.k for _, m in models),
        levels=(1, 2, 3),
        progress=True,
    )
    base.fit(ds.train)
    t0 = time.perf_counter()
    feats, names = base._extract([t.path for t in ds.test], "test features")
    feat_s = (time.perf_counter() - t0) / len(names)
    labels = np.array([t.label for t in ds.test])
    masks = load_masks(ds, base.image_size, base.crop_size, base.geometry)
    valid = base.valid_regions([t.path for t in ds.test])
    out = []
    level_cache: dict[tuple[int, int], tuple[list, float]] = {}
    for label, m in models:
        m.bank_ = base.bank_  # same training features
        m.k_, m.image_k_ = min(m.k, len(base.bank_)), min(m.image_k or m.k, len(base.bank_))
        knn, nb, _ = m._knn(feats.global_)
        search_s = 0.0
        per_level = []
        for lv in m.levels:
            key = (lv, m.k_, m.window)
            if key not in level_cache:
                t = time.perf_counter()
                # The model's own search (exact, or its window), on the shared bank's level lv.
                maps_lv = [
                    m._level_maps([feats.levels[lv - 1][i]], nb[i], level_index=[lv - 1])[0][0]
                    for i in range(len(names))
                ]
                level_cache[key] = (maps_lv, (time.perf_counter() - t) / len(names))
            per_level.append(level_cache[key][0])
            search_s += level_cache[key][1]
        t = time.perf_counter()
        maps = np.stack(
            [
                smooth(combine_levels([pl[i] for pl in per_level], m.crop_size).numpy(), m.sigma)
                for i in range(len(names))
            ]
        )
        finish_s = (time.perf_counter() - t) / len(names)
        scores = m._image_score(knn, maps, valid)
        out.append(
            {
                "setting": label,
                "image_auroc": image_auroc(labels, scores),
                "pixel_auroc": pixel_auroc(masks, maps, valid=valid),
                "pro": pro_auc(masks, maps, valid=valid),
                "s_img": feat_s + search_s + finish_s,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="transistor,magnetic_tile")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown")
    ap.add_argument(
        "--rows", default=None, help="only the rows whose label contains one of these comma-separated strings"
    )
    args = ap.parse_args(argv)
    rows = (
        ROWS
        if args.rows is None
        else [(label, params) for label, params in ROWS if any(p in label for p in args.rows.split(","))]
    )
    if not rows:
        ap.error(f"--rows {args.rows!r} matches no row")
    models = [(label, SPADE(**params)) for label, params in rows]
    for _, m in models:
        m._validate()  # kappa is 1 in every row: the shared search below is the kappa = 1 search
    groups: dict[tuple, list[tuple[str, SPADE]]] = {}
    for label, m in models:
        groups.setdefault(tuple(getattr(m, k) for k in FEATURE_KEYS), []).append((label, m))
    md = []
    for name in args.datasets.split(","):
        root, cat = DATASETS[name]
        ds = load_mvtec(root, cat)
        results = {}
        for members in groups.values():
            for r in run_group(ds, members):
                results[r["setting"]] = r
        header = f"{'setting':<36} {'image AUROC':>11} {'pixel AUROC':>11} {'PRO':>7} {'s/img':>6}"
        print(f"\n{name}: {len(ds.train)} train, {len(ds.test)} test images\n{header}\n{'-' * len(header)}")
        md += [
            f"\n**{name}** ({len(ds.train)} train, {len(ds.test)} test images)\n",
            "| setting | image AUROC | pixel AUROC | PRO | s/img |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, _ in rows:
            r = results[label]
            print(
                f"{label:<36} {r['image_auroc']:>11.4f} {r['pixel_auroc']:>11.4f} {r['pro']:>7.4f} {r['s_img']:>6.2f}"
            )
            md.append(
                f"| {label} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['pro']:.4f} | {r['s_img']:.2f} |"
            )
        sys.stdout.flush()
    if args.markdown is not None:
        args.markdown.write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
