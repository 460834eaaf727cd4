"""Speed of SPADE's pixel stage: the naive full-matrix reference against our tiled exact search.

    .venv/bin/python benchmarks/bench_pixel_search.py [--category transistor] [--n-naive 5] [--n-wrn 5]

In one process, on MVTec AD transistor with k = 50 (the paper's gallery of the 50 nearest normal
images' pixel features):

* measures this machine's fp32 GEMM peak (median of ``torch.matmul`` of two 4096 x 4096 matrices);
* fits the embedded backbone on transistor's training images and extracts every test image's features;
* times the pixel stage per image (gather the gallery, search every level, upsample, average, smooth)
  for the naive reference (``torch.cdist`` full distance matrix, then ``min``, as the reference
  implementation does), for ours (exact fp32), and for the opt-in options (bf16 products, float16
  bank, local window R); the median over images is reported, the naive one on ``--n-naive`` images;
* computes pixel AUROC and PRO of every option on all test images, and their change against exact;
* repeats the timing with Wide-ResNet-50-2's shapes (256/512/1024 channels at 56/28/14), from a
  WRN50 with seeded random weights (timing does not depend on the weights; its AUROC is meaningless);
* reports achieved GFLOP/s (2 d flops per distance, every level) and its fraction of the peak, and the
  process's peak RSS after each row (rows run in order, so a row's figure includes all rows above).

Not part of the test suite: about 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from spade_ad import SPADE
from spade_ad.bank import FeatureBank
from spade_ad.data import load_mvtec
from spade_ad.evaluate import load_masks
from spade_ad.metrics import pixel_auroc, pro_auc

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_ad"


def gemm_peak(n: int = 4096, repeats: int = 7) -> float:
    """fp32 GFLOP/s of a large square matmul (median of repeats): this machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def naive_maps(model: SPADE, test_levels: list[torch.Tensor], neighbors: torch.Tensor) -> list[torch.Tensor]:
    """The reference implementation's search: the full (test pixels x gallery) distance matrix, then min."""
    maps = []
    for i, t in enumerate(test_levels):
        h, w, c = t.shape
        gallery = model.bank_.gallery(i, neighbors).reshape(-1, c)
        maps.append(torch.cdist(t.reshape(-1, c), gallery).min(dim=1).values.reshape(h, w))
    return maps


def faiss_maps(model: SPADE, test_levels: list[torch.Tensor], neighbors: torch.Tensor) -> list[torch.Tensor]:
    """faiss exact search (``IndexFlatL2``, k = 1) per level, for comparison (optional dependency)."""
    import faiss

    maps = []
    for i, t in enumerate(test_levels):
        h, w, c = t.shape
        index = faiss.IndexFlatL2(c)
        index.add(model.bank_.gallery(i, neighbors).reshape(-1, c).numpy())
        d2, _ = index.search(np.ascontiguousarray(t.reshape(-1, c).numpy()), 1)
        maps.append(torch.from_numpy(np.sqrt(np.maximum(d2[:, 0], 0.0))).reshape(h, w))
    return maps


def pixel_stage(model: SPADE, feats: list[torch.Tensor], nb: torch.Tensor, search: Callable | None) -> np.ndarray:
    """One image's anomaly map from its features and neighbours: search every level, combine, smooth."""
    if search is None:
        level_maps, _ = model._level_maps(feats, nb)
    else:
        level_maps = search(model, feats, nb)
    return model._finish_map(level_maps)


def flops_per_image(model: SPADE, feats: list[torch.Tensor]) -> float:
    """2 d flops per (test pixel, gallery feature) distance, summed over levels (full search)."""
    return float(sum(2 * t.shape[2] * (t.shape[0] * t.shape[1]) * (model.k_ * t.shape[0] * t.shape[1]) for t in feats))


def window_flops(model: SPADE, feats: list[torch.Tensor], r: int) -> float:
    return float(sum(2 * t.shape[2] * t.shape[0] * t.shape[1] * model.k_ * (2 * r + 1) ** 2 for t in feats))


def run_rows(
    model: SPADE,
    levels: list[torch.Tensor],
    nbs: torch.Tensor,
    rows: list[tuple],
    masks: np.ndarray | None,
    n_naive: int,
    peak: float,
    n_eval: int,
) -> list[list[str]]:
    """Time (and, with masks, score) each row; returns table rows."""
    n_test = levels[0].shape[0]

    def per_image(i: int) -> list[torch.Tensor]:
        return [lv[i] for lv in levels]

    out, exact_maps, naive_time = [], None, None
    full_flops = flops_per_image(model, per_image(0))
    for name, setup, search in rows:
        label = name
        restore = setup(model)
        n = n_naive if search in (naive_maps, faiss_maps) else min(n_eval, n_test)
        times, maps = [], []
        for i in range(n):
            t0 = time.perf_counter()
            maps.append(pixel_stage(model, per_image(i), nbs[i], search))
            times.append(time.perf_counter() - t0)
        restore(model)
        sec = statistics.median(times)
        if search is naive_maps:
            naive_time = sec
            if exact_maps is not None:
                rel = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(maps, exact_maps, strict=True))
                label += f" (max rel. diff vs ours {rel:.1e})"
        flops = window_flops(model, per_image(0), int(label.split("R=")[1].split()[0])) if "R=" in label else full_flops
        gflops = flops / sec / 1e9
        pix = pro = "-"
        if masks is not None and search is None and n == n_test:
            m = np.stack(maps)
            pa, pr = pixel_auroc(masks, m), pro_auc(masks, m)
            if exact_maps is None:
                exact_maps, base = maps, (pa, pr)
                pix, pro = f"{pa:.4f}", f"{pr:.4f}"
            else:
                pix, pro = f"{pa:.4f} ({pa - base[0]:+.4f})", f"{pr:.4f} ({pr - base[1]:+.4f})"
        out.append(
            [label, f"{sec:.3f}", sec, f"{gflops:.0f}", f"{100 * gflops / peak:.0f}%", pix, pro, f"{peak_rss_mb():.0f}"]
        )
        print(f"  {label}: {sec:.3f} s/img", file=sys.stderr)
    for row in out:  # speed-up against the naive row, which runs last (its full matrices inflate peak RSS)
        row[2] = "-" if naive_time is None else f"{naive_time / row[2]:.1f}x"
    return out


def no_setup(model: SPADE) -> Callable:
    return lambda m: None


def set_attr(**values: object) -> Callable:
    def setup(model: SPADE) -> Callable:
        old = {k: getattr(model, k) for k in values}
        for k, v in values.items():
            setattr(model, k, v)
        return lambda m: [setattr(m, k, v) for k, v in old.items()]

    return setup


def half_bank(model: SPADE) -> Callable:
    old = model.bank_
    model.bank_ = FeatureBank(old.global_, [lv.to(torch.float16) for lv in old.levels], old.paths)
    return lambda m: setattr(m, "bank_", old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--category", default="transistor")
    ap.add_argument("--n-naive", type=int, default=5, help="test images timed with the (slow) naive reference")
    ap.add_argument("--n-wrn", type=int, default=5, help="test images timed with WRN50 shapes")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N test images (smoke runs)")
    ap.add_argument("--windows", default="1,2,4", help="window radii to time (at stride 4; same R at every level)")
    args = ap.parse_args()
    torch.manual_seed(0)
    peak = gemm_peak()
    print(
        f"fp32 GEMM peak (4096^3 matmul, median of 7): {peak:.0f} GFLOP/s; torch threads: "
        f"{torch.get_num_threads()}; torch {torch.__version__}"
    )

    ds = load_mvtec(args.data, args.category)
    if args.limit:
        ds.test = ds.test[: args.limit]
    test_paths = [t.path for t in ds.test]
    header = [
        "row",
        "s/img (median)",
        "speed-up vs naive",
        "GFLOP/s",
        "of fp32 peak",
        "pixel AUROC (change)",
        "PRO (change)",
        "peak RSS MB",
    ]
    radii = [int(r) for r in args.windows.split(",") if r.strip()]

    # Embedded backbone, real weights, every test image.
    model = SPADE().fit(list(ds.train))
    g, lv = model.extract(test_paths)
    levels = [x.permute(0, 2, 3, 1).contiguous() for x in lv]
    _, nbs, _ = model._knn(g)
    masks = load_masks(ds, model.image_size, model.crop_size)
    rows = [
        ("ours, exact fp32", no_setup, None),
        ("ours, bf16 products (opt-in)", set_attr(precision="bf16"), None),
        ("ours, float16 bank (opt-in)", half_bank, None),
    ]
    rows += [(f"ours, window R={r} (opt-in)", set_attr(window=r), None) for r in radii]
    rows += faiss_row()
    rows += [("naive reference (cdist full matrix)", no_setup, naive_maps)]
    shapes = ", ".join(f"{t.shape[3]}@{t.shape[1]}x{t.shape[2]}" for t in levels)
    titles = [
        f"\n### Embedded EfficientNet-Lite0 ({shapes}), {args.category}, k={model.k_}, {len(test_paths)} test images\n"
    ]
    table = run_rows(model, levels, nbs, rows, masks, args.n_naive, peak, len(test_paths))
    tables = [table]

    # WRN50 shapes: random weights (timing only), a gallery of k=50 training images.
    wrn = SPADE(backbone="wide_resnet50_2", weights="random", batch_size=4).fit(ds.train[:50])
    g, lv = wrn.extract(test_paths[: args.n_wrn])
    levels = [x.permute(0, 2, 3, 1).contiguous() for x in lv]
    _, nbs, _ = wrn._knn(g)
    rows = [("ours, exact fp32", no_setup, None), ("ours, bf16 products (opt-in)", set_attr(precision="bf16"), None)]
    rows += [(f"ours, window R={r} (opt-in)", set_attr(window=r), None) for r in radii]
    rows += faiss_row()
    rows += [("naive reference (cdist full matrix)", no_setup, naive_maps)]
    shapes = ", ".join(f"{t.shape[3]}@{t.shape[1]}x{t.shape[2]}" for t in levels)
    titles.append(f"\n### Wide-ResNet-50-2 shapes ({shapes}), random weights, k={wrn.k_}, {args.n_wrn} test images\n")
    tables.append(run_rows(wrn, levels, nbs, rows, None, args.n_wrn, peak, args.n_wrn))
    # The machine is shared: the peak is measured again at the end, and the higher one is used (so the
    # fractions below are, if anything, understated).
    peak2 = gemm_peak()
    if peak2 > peak:
        for t in tables:
            for row in t:
                row[4] = f"{100 * float(row[3]) / peak2:.0f}%"
    print(
        f"\nfp32 GEMM peak: {peak:.0f} GFLOP/s at the start, {peak2:.0f} at the end; fractions use "
        f"{max(peak, peak2):.0f}"
    )
    for title, t in zip(titles, tables, strict=True):
        print(title)
        print_table(header, t)


def faiss_row() -> list[tuple]:
    """The faiss row when faiss is installed (it is not a dependency of spade-ad)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        print("faiss not installed: no faiss row (pip install faiss-cpu to add it)", file=sys.stderr)
        return []
    return [("faiss IndexFlatL2, exact (for comparison)", no_setup, faiss_maps)]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
