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

#: PatchCore's options, each added to the accurate preset of 2026-11-29 (``accurate-v1``), and variants
#: of the presets built from them (docs/patchcore.md); these rows run alone.
_OLD = PRESETS["accurate-v1"]
_NEW = PRESETS["joint-coreset"]
_ACC = PRESETS["accurate"]
ROWS += [
    ("accurate-v1 + joint levels", {**_OLD, "joint_levels": True}),
    ("accurate-v1 + joint levels, sigma 8", {**_OLD, "joint_levels": True, "sigma": 8.0}),
    ("accurate-v1 + joint, patch_size=(3, 5)", {**_OLD, "joint_levels": True, "patch_size": (3, 5)}),
    ("accurate-v1 + joint, patch_size=(5, 7)", {**_OLD, "joint_levels": True, "patch_size": (5, 7)}),
    ("accurate-v1 + gallery all, coreset 10%", {**_OLD, "gallery": "all", "coreset": 0.1}),
    ("accurate-v1 + joint, gallery all (no coreset)", {**_OLD, "joint_levels": True, "gallery": "all"}),
    ("accurate with precision fp32", {**_ACC, "precision": "fp32"}),
    ("accurate with gallery all, coreset 10%", {**_ACC, "gallery": "all", "coreset": 0.1}),
    ("joint-coreset with coreset 1%", {**_NEW, "coreset": 0.01}),
    ("joint-coreset with patch_size=3, sigma 8", {**_NEW, "patch_size": 3, "sigma": 8.0}),
    ("joint-coreset with image score map_max", {**_NEW, "image_score": "map_max"}),
]

# Settings that change the features themselves; rows agreeing on these share one extraction.
FEATURE_KEYS = ("backbone", "image_size", "crop_size", "patch_size", "geometry")


def run_alone(ds, label: str, model: SPADE) -> dict[str, Any]:
    """Evaluate one model that shares nothing (joint features, a gallery of every image, a coreset):
    fit it (timed, coreset included) and predict the test set through its public API."""
    model.progress = True
    t = time.perf_counter()
    model.fit(ds.train)
    fit_s = time.perf_counter() - t
    paths = [t.path for t in ds.test]
    t = time.perf_counter()
    pred = model.predict(paths)
    s_img = (time.perf_counter() - t) / len(paths)
    labels = np.array([t.label for t in ds.test])
    masks = load_masks(ds, model.image_size, model.crop_size, model.geometry)
    maps, valid = pred.anomaly_maps, pred.valid
    return {
        "setting": label,
        "image_auroc": image_auroc(labels, pred.image_scores),
        "pixel_auroc": pixel_auroc(masks, maps, valid=valid),
        "pro": pro_auc(masks, maps, valid=valid),
        "s_img": s_img,
        "fit_s": fit_s,
        "per_defect": per_defect(ds, labels, pred.image_scores, masks, maps, valid),
    }


def per_defect(ds, labels, scores, masks, maps, valid) -> dict[str, tuple[float, float, float]]:
    """Per defect type: (image AUROC of that type against the good images, pixel AUROC, PRO on its images)."""
    defects = np.array([t.defect for t in ds.test])
    out = {}
    for d in sorted(set(defects) - {"good"}):
        both = (defects == d) | (labels == 0)
        own = defects == d
        v = None if valid is None else valid[own]
        out[d] = (
            image_auroc(labels[both], scores[both]),
            pixel_auroc(masks[own], maps[own], valid=v),
            pro_auc(masks[own], maps[own], valid=v),
        )
    return out


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
    t0 = time.perf_counter()
    base.fit(ds.train)
    fit_s = time.perf_counter() - t0
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
                "fit_s": fit_s,
            }
        )
    return out


def _matches(pattern: str, label: str) -> bool:
    """``--rows`` items match a label containing them; a trailing ``$`` anchors them at the label's end."""
    return label.endswith(pattern[:-1]) if pattern.endswith("$") else pattern in label


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="transistor,magnetic_tile")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown")
    ap.add_argument(
        "--rows",
        default=None,
        help="only the rows whose label contains one of these comma-separated strings ('...$': ends with it)",
    )
    ap.add_argument("--subset", action="store_true", help="every 4th training and every 3rd test image")
    args = ap.parse_args(argv)
    rows = (
        ROWS
        if args.rows is None
        else [(label, params) for label, params in ROWS if any(_matches(p, label) for p in args.rows.split(","))]
    )
    if not rows:
        ap.error(f"--rows {args.rows!r} matches no row")
    models = [(label, SPADE(**params)) for label, params in rows]
    for _, m in models:
        m._validate()  # kappa is 1 in every row: the shared search below is the kappa = 1 search
    groups: dict[tuple, list[tuple[str, SPADE]]] = {}
    # Joint features, a gallery of every image and per-level patch sizes cannot share the group's
    # three-level extraction: those rows fit and predict on their own.
    alone = [
        (label, m) for label, m in models if m.joint_levels or m.gallery == "all" or not isinstance(m.patch_size, int)
    ]
    for label, m in models:
        if (label, m) not in alone:
            groups.setdefault(tuple(getattr(m, k) for k in FEATURE_KEYS), []).append((label, m))
    md = []
    for name in args.datasets.split(","):
        root, cat = DATASETS[name]
        ds = load_mvtec(root, cat)
        if args.subset:  # the real-data test's subset: every 4th training, every 3rd test image
            ds.train, ds.test = ds.train[::4], ds.test[::3]
        results = {}
        for members in groups.values():
            for r in run_group(ds, members):
                results[r["setting"]] = r
        for label, m in alone:
            results[label] = run_alone(ds, label, m)
        header = f"{'setting':<44} {'image AUROC':>11} {'pixel AUROC':>11} {'PRO':>7} {'s/img':>6} {'fit s':>6}"
        print(f"\n{name}: {len(ds.train)} train, {len(ds.test)} test images\n{header}\n{'-' * len(header)}")
        md += [
            f"\n**{name}** ({len(ds.train)} train, {len(ds.test)} test images)\n",
            "| setting | image AUROC | pixel AUROC | PRO | s/img | fit s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, _ in rows:
            r = results[label]
            cells = [f"{r[key]:.4f}" for key in ("image_auroc", "pixel_auroc", "pro")]
            figures = " | ".join([*cells, f"{r['s_img']:.2f}", f"{r['fit_s']:.0f}"])
            print(f"{label:<44} " + " ".join(f"{x:>11}" for x in figures.split(" | ")))
            md.append(f"| {label} | {figures} |")
        for label, _ in alone:
            md += [
                f"\nPer defect type, {label} (image AUROC against the good images / pixel AUROC / PRO):\n",
                "| defect | image AUROC | pixel AUROC | PRO |",
                "|---|---:|---:|---:|",
            ]
            for d, (i, p, o) in results[label]["per_defect"].items():
                md.append(f"| {d} | {i:.4f} | {p:.4f} | {o:.4f} |")
                print(f"  {label} / {d}: image {i:.4f} pixel {p:.4f} PRO {o:.4f}")
        sys.stdout.flush()
    if args.markdown is not None:
        args.markdown.write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
