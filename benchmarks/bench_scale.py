"""Memory and image-level search time of ``spade-ad predict`` with a 10,000-image bank.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 200,10000] [--images 10] [--repeats 3]

A real model is fitted on a few transistor training images (for its configuration and backbone
hash); its bank is then replaced by synthetic features of the embedded backbone's shapes (global
1280; pixel levels 24@56x56, 40@28x28, 112@14x14) for N training images, stored as float16 and
written in the real model format (safetensors, checksum). For each N the real command

    spade-ad predict MODEL <transistor test images> --out DIR --no-overlays   (pixel features memory-mapped)

runs in a child process; its peak RSS comes from ``wait4`` (the kernel's figure, as ``/usr/bin/time
-v`` reports), read by a tiny launcher process (see ``LAUNCHER``). The same is done with ``--no-mmap``
(the whole bank in memory) for contrast. Then, in this process, the image-level kNN search (k = 50)
against the N global features is timed per query, alone and in batches of 64. Medians of ``--repeats``
runs. Needs about 3 GB of free disk for N = 10,000.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from spade_ad import SPADE
from spade_ad.bank import FeatureBank, save_model_file
from spade_ad.data import load_mvtec

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_ad"


def synthetic_model(base: SPADE, n: int, path: Path) -> Path:
    """``base``'s configuration with a bank of ``n`` synthetic images (float16 pixel features)."""
    gen = torch.Generator().manual_seed(n)
    ref = base.bank_
    # Scale like the real features so distances are of a realistic size.
    g_scale = float(ref.global_.std())
    global_ = torch.randn(n, ref.global_.shape[1], generator=gen) * g_scale + ref.global_.mean(0)
    levels = []
    for lv in ref.levels:
        out = torch.empty((n, *lv.shape[1:]), dtype=torch.float16)
        scale, mean = float(lv.float().std()), float(lv.float().mean())
        for s in range(0, n, 500):  # in chunks: never a float32 copy of the whole level
            e = min(s + 500, n)
            out[s:e] = (torch.randn((e - s, *lv.shape[1:]), generator=gen) * scale + mean).clamp_(min=0)
        levels.append(out)
    bank = FeatureBank(global_, levels, [f"synthetic/{i:06d}.png" for i in range(n)])
    cfg = base.get_config()
    cfg["n_train"] = n
    return save_model_file(path, bank, cfg)


#: Runs the command given as arguments and prints its peak RSS (kB). Linux charges a child the RSS its
#: parent had when it was spawned (the pre-exec address space), so the predict command is started from
#: this tiny launcher rather than from the benchmark process, which holds the synthetic banks.
LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(usage.ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_predict(model: Path, images: list[str], out: Path, mmap: bool) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one ``spade-ad predict`` child process."""
    cmd = [
        sys.executable,
        "-m",
        "spade_ad.cli",
        "predict",
        str(model),
        *images,
        "--out",
        str(out),
        "--no-overlays",
        "--overwrite",
        "--mmap" if mmap else "--no-mmap",
    ]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], check=False, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"predict failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return int(r.stdout.strip().splitlines()[-1]) / 1024, wall


def knn_ms_per_query(model_path: Path, queries: torch.Tensor, batch: int, repeats: int = 20) -> float:
    model = SPADE.load(model_path, mmap=True)
    model._knn(queries[:batch])  # warm-up (and the cached bank norms)
    times = []
    for r in range(repeats):
        q = queries[(r * batch) % len(queries) :][:batch]
        t0 = time.perf_counter()
        model._knn(q)
        times.append((time.perf_counter() - t0) / len(q))
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="200,10000")
    ap.add_argument("--images", type=int, default=10, help="transistor test images per predict run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmp", type=Path, default=None, help="where to write the synthetic model files")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    ds = load_mvtec(DATA, "transistor")
    images = [str(t.path) for t in ds.test[: args.images]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only 20 training images for k=50": the bank is replaced below
        base = SPADE(k=50, bank_dtype="float16").fit(ds.train[:20])
    queries, _ = base.extract([t.path for t in ds.test[:64]])
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in sizes:
            t0 = time.perf_counter()
            path = synthetic_model(base, n, Path(tmp) / f"bank{n}.safetensors")
            size_mb = path.stat().st_size / 2**20
            print(f"N={n}: wrote {size_mb:.0f} MB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            rss, wall, rss_mem = [], [], []
            for _ in range(args.repeats):
                r, w = run_predict(path, images, Path(tmp) / "out", mmap=True)
                rss.append(r)
                wall.append(w)
            rss_mem.append(run_predict(path, images, Path(tmp) / "out", mmap=False)[0])
            one = knn_ms_per_query(path, queries, 1)
            batched = knn_ms_per_query(path, queries, 64, repeats=5)
            rows.append((n, size_mb, statistics.median(rss), statistics.median(wall), rss_mem[0], one, batched))
            path.unlink()
    base_rss = rows[0][2]
    print(
        f"\n`spade-ad predict` on {len(images)} transistor test images, k=50, float16 pixel bank; "
        f"medians of {args.repeats} runs\n"
    )
    print(
        "| training images | model file MB | peak RSS MB (mmap) | vs first row | wall s (incl. start-up) | "
        "peak RSS MB (--no-mmap) | image kNN ms/query (1 query) | ms/query (batches of 64) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, size_mb, rss, wall, rss_mem, one, batched in rows:
        print(
            f"| {n} | {size_mb:.0f} | {rss:.0f} | {rss / base_rss:.2f}x | {wall:.1f} | {rss_mem:.0f} | "
            f"{one:.2f} | {batched:.3f} |"
        )


if __name__ == "__main__":
    main()
