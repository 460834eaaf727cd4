"""Line speed: end-to-end images/s of ``predict`` per preset and backbone runtime, where the time goes, the
window kernels, and throughput next to a competing CPU-heavy process.

    flock /work/heavy.lock .venv/bin/python benchmarks/bench_throughput.py [--runs 3] [--backbone-only]

In one invocation, on MVTec AD transistor (``../shared/datasets``):

1. fits the ``paper`` (``SPADE()``), ``accurate`` and ``fast`` presets on the 213 training images and saves
   them (fitting is not timed);
2. for every preset x runtime (torch, onnxruntime, openvino): loads the model file as ``spade-ad predict``
   does (memory-mapped bank), warms up on 2 images, then times ``predict`` of the 100 test images from their
   files plus writing every map (``.npy``) -- the median of ``--runs`` runs -> images/s, and the ratio to
   the paper settings with torch measured here;
3. splits one run per preset (its fastest runtime) into stages: decode+resize, backbone, kNN, pixel search,
   upsampling+smoothing, writing (s/img);
4. times the two window kernels (block GEMM search, per-offset kernel) at the embedded backbone's level shapes;
5. starts a competing process (a 2-thread torch matmul loop), and measures the fast and paper presets in a
   fresh process per thread policy, alone and next to it, then stops it: the slowdown ratio per policy.

``--backbone-only`` instead times the backbone alone per runtime at each preset's input size.

Not part of the test suite (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spade_ad import SPADE
from spade_ad.data import load_mvtec, load_preprocessed
from spade_ad.search import window_distances, window_nearest

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_ad"
PRESET_NAMES = ("paper", "accurate", "fast")
RUNTIMES = ("torch", "onnxruntime", "openvino")
#: Thread policies compared next to a competing process: environment set before torch is imported.
POLICIES = {
    "spade-ad default (OMP_WAIT_POLICY=PASSIVE)": {},
    "libgomp default (spin)": {"SPADE_AD_THREAD_POLICY": "off"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
COMPETITOR = "import torch\na = torch.randn(1500, 1500)\nwhile True:\n    a @ a\n"


def predict_and_write(model: SPADE, paths: list[Path], out: Path) -> float:
    """Seconds to predict ``paths`` and write every map, as ``spade-ad predict`` writes them."""
    t0 = time.perf_counter()
    pred = model.predict(paths)
    for i, amap in enumerate(pred.anomaly_maps):
        np.save(out / f"{i:03d}.npy", amap)
    return time.perf_counter() - t0


def stage_split(model: SPADE, paths: list[Path], out: Path) -> dict[str, float]:
    """Seconds per image in each stage of predict, timed stage by stage over all images."""
    t = {}
    t0 = time.perf_counter()
    arrays = [
        load_preprocessed(p, str(p), model.image_size, model.crop_size, model.max_pixels, model.geometry) for p in paths
    ]
    t["decode+resize"] = time.perf_counter() - t0
    bb = model._get_backbone()
    t0 = time.perf_counter()
    globals_, levels = [], [[] for _ in model.levels]
    for s in range(0, len(arrays), model.batch_size):
        g, lv = bb(torch.from_numpy(np.stack(arrays[s : s + model.batch_size])))
        globals_.append(g)
        for dst, i in zip(levels, model.levels, strict=True):
            x = lv[i - 1]
            if model.patch_size > 1:
                p = model.patch_size
                x = F.avg_pool2d(x, p, stride=1, padding=p // 2, count_include_pad=False)
            dst.append(x.permute(0, 2, 3, 1))
    g_all, lv_all = torch.cat(globals_), [torch.cat(x) for x in levels]
    t["backbone"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, nb, _ = model._knn(g_all)
    t["kNN"] = time.perf_counter() - t0
    t["pixel search"] = t["upsample+smooth"] = t["write"] = 0.0
    for j in range(len(paths)):
        t0 = time.perf_counter()
        maps, _ = model._level_maps([lv[j] for lv in lv_all], nb[j])
        t1 = time.perf_counter()
        amap = model._finish_map(maps)
        t2 = time.perf_counter()
        np.save(out / f"{j:03d}.npy", amap)
        t3 = time.perf_counter()
        t["pixel search"] += t1 - t0
        t["upsample+smooth"] += t2 - t1
        t["write"] += t3 - t2
    return {k: v / len(paths) for k, v in t.items()}


def backbone_only(paths: list[Path], runs: int) -> list[tuple[str, int, dict[str, float]]]:
    """(preset, crop size, {runtime: s/img}) of the backbone alone on decoded images (median of ``runs``)."""
    rows = []
    for name in PRESET_NAMES:
        cfg = SPADE.from_preset(name)
        x = torch.from_numpy(
            np.stack([load_preprocessed(p, str(p), cfg.image_size, cfg.crop_size, cfg.max_pixels) for p in paths])
        )
        per = {}
        for rt in RUNTIMES:
            bb = SPADE.from_preset(name, runtime=rt)._get_backbone()
            bb(x[:2])
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                for s in range(0, len(x), cfg.batch_size):
                    bb(x[s : s + cfg.batch_size])
                times.append(time.perf_counter() - t0)
            per[rt] = statistics.median(times) / len(x)
        rows.append((name, cfg.crop_size, per))
    return rows


def window_kernels(repeats: int = 5) -> list[tuple[str, float, float]]:
    """(shape, block search ms, per-offset kernel ms) for K = 50 at the embedded backbone's level shapes."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for h, c in ((56, 24), (28, 40), (14, 112), (35, 40), (18, 112)):
        for r in (1, 2, 3):
            t = torch.rand(h, h, c, generator=gen)
            g = torch.rand(50, h, h, c, generator=gen)
            times = {}
            for name, fn in (("block", window_distances), ("offset", window_nearest)):
                fn(t, g, r)
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn(t, g, r)
                    ts.append(time.perf_counter() - t0)
                times[name] = statistics.median(ts) * 1e3
            rows.append((f"{h}x{h}x{c}, R={r}", times["block"], times["offset"]))
    return rows


def probe(model_path: str, n: int) -> None:
    """Child process: s/img of predict on ``n`` transistor test images (after a warm-up), printed."""
    paths = [t.path for t in load_mvtec(DATA, "transistor").test][::3][:n]
    model = SPADE.load(model_path, mmap=True)
    model.predict(paths[:2])
    t0 = time.perf_counter()
    model.predict(paths)
    print(f"{(time.perf_counter() - t0) / len(paths):.5f} {torch.get_num_threads()}")


def run_probe(model_path: Path, env: dict[str, str], n: int) -> tuple[float, int]:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, __file__, "--probe", str(model_path), "--n", str(n)],
        env={**full, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[-2]), int(out[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=16, help="images per competing-process probe")
    ap.add_argument("--backbone-only", action="store_true", help="only the backbone per runtime and input size")
    args = ap.parse_args()
    if args.probe:
        probe(args.probe, args.n)
        return
    if args.backbone_only:
        test = [t.path for t in load_mvtec(DATA, "transistor").test]
        print(f"## Backbone alone, {len(test)} transistor test images, s/img, median of {args.runs}")
        print("| preset (crop) | torch | onnxruntime | openvino | torch / openvino |\n|---|---:|---:|---:|---:|")
        for name, crop, per in backbone_only(test, args.runs):
            cells = " | ".join(f"{per[rt]:.4f}" for rt in RUNTIMES)
            print(f"| {name} ({crop}) | {cells} | {per['torch'] / per['openvino']:.2f} |")
        return
    ds = load_mvtec(DATA, "transistor")
    train, test = ds.train, [t.path for t in ds.test]
    print(
        f"transistor: {len(train)} train, {len(test)} test; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    files = {}
    for name in PRESET_NAMES:
        # Fitted with OpenVINO for speed: every runtime gives the same features (tests/test_line_speed.py).
        files[name] = SPADE.from_preset(name, runtime="openvino").fit(train).save(tmp / f"{name}.safetensors")

    print(f"\n## End-to-end predict + write maps, {len(test)} images, median of {args.runs}")
    print("| preset | runtime | images/s | s/img | x paper (torch) |\n|---|---|---:|---:|---:|")
    base = None
    best: dict[str, tuple[float, str]] = {}
    for name in PRESET_NAMES:
        for rt in RUNTIMES:
            model = SPADE.load(files[name], mmap=True, runtime=rt)
            out = tmp / f"out-{name}-{rt}"
            out.mkdir()
            predict_and_write(model, test[:2], out)  # warm-up: builds the runtime, first allocations
            sec = statistics.median(predict_and_write(model, test, out) for _ in range(args.runs))
            ips = len(test) / sec
            base = base if base is not None else ips
            if ips > best.get(name, (0.0, ""))[0]:
                best[name] = (ips, rt)
            print(f"| {name} | {rt} | {ips:.2f} | {sec / len(test):.4f} | {ips / base:.2f} |", flush=True)

    print("\n## Stage split (s/img), each preset with its fastest runtime")
    stages = {}
    for name in PRESET_NAMES:
        model = SPADE.load(files[name], mmap=True, runtime=best[name][1])
        model.predict(test[:2])
        out = tmp / f"split-{name}"
        out.mkdir()
        stages[name] = stage_split(model, test, out)
    keys = list(next(iter(stages.values())))
    print("| preset (runtime) | " + " | ".join(keys) + " | sum |\n|---|" + "---:|" * (len(keys) + 1))
    for name, st in stages.items():
        vals = " | ".join(f"{st[k]:.4f}" for k in keys)
        print(f"| {name} ({best[name][1]}) | {vals} | {sum(st.values()):.4f} |")

    print("\n## Window kernels, K = 50 (ms per level map, median of 5)")
    print("| level shape | block search | per-offset kernel | block / offset |\n|---|---:|---:|---:|")
    for shape, blk, off in window_kernels():
        print(f"| {shape} | {blk:.1f} | {off:.1f} | {blk / off:.2f} |")

    print(f"\n## Next to a competing process (2-thread torch matmul loop), {args.n} images, fresh process each")
    print("| preset | thread policy | alone s/img | with competitor s/img | slowdown |\n|---|---|---:|---:|---:|")
    for name in ("fast", "paper"):
        alone = {p: run_probe(files[name], env, args.n) for p, env in POLICIES.items()}
        comp = subprocess.Popen([sys.executable, "-c", COMPETITOR], env={**os.environ, "OMP_NUM_THREADS": "2"})
        try:
            time.sleep(3)
            busy = {p: run_probe(files[name], env, args.n) for p, env in POLICIES.items()}
        finally:
            comp.terminate()
            comp.wait()
        for p in POLICIES:
            a, b = alone[p][0], busy[p][0]
            print(f"| {name} | {p} ({alone[p][1]} threads) | {a:.4f} | {b:.4f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
