"""Throughput of ``spade-ad predict`` single-process vs ``--engine ray``, and the per-worker memory.

    .venv/bin/python benchmarks/bench_ray.py [--k 50] [--repeat-list 4] [--repeats 3]

Inputs: the 100 transistor test images, listed ``--repeat-list`` times (symlinks with distinct names, so
Ray scores every one; at least 400 inputs). Model: fitted single-process on transistor/train/good with
the paper defaults and ``--k``. Every mode runs the real command in a child process, from start-up to
the final line (wall clock; medians of ``--repeats``):

- ``local``: ``spade-ad predict MODEL DIR --out D --no-overlays`` (torch on every core);
- ``ray, N workers, this machine``: the same with ``--engine ray --num-workers N`` (a Ray instance on this
  machine started by the command itself; one core per worker);
- ``ray, 2-node cluster``: ``--engine ray --address A`` against ``ray.cluster_utils.Cluster`` (a head and
  a second node, 1 CPU each), started once by this script.

Peak RSS: the local command's from ``wait4``; a Ray worker's is the highest ``VmHWM`` (the kernel's
high-water mark) seen for the actor processes that hold the model, sampled every 0.2 s.
Ray overhead per image: (median wall of the Ray run - median wall of the local run) / inputs.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from spade_ad import SPADE

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_ad" / "transistor"
LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(usage.ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


class WorkerRss(threading.Thread):
    """Samples the peak RSS (VmHWM) of every Ray actor process that holds the model."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kb: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for proc in Path("/proc").iterdir():
                try:
                    if not proc.name.isdigit():
                        continue
                    if b"MapBatches(Scorer)" not in (proc / "cmdline").read_bytes():
                        continue
                    hwm = re.search(r"VmHWM:\s+(\d+)", (proc / "status").read_text())
                    if hwm:
                        pid = int(proc.name)
                        self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), int(hwm.group(1)))
                except OSError:
                    continue
            time.sleep(0.2)


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, command's own peak RSS MB, peak RSS MB of a Ray worker or 0) of one run."""
    sampler = WorkerRss()
    sampler.start()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    worker = max(sampler.peak_kb.values(), default=0) / 1024
    return wall, int(r.stdout.strip().splitlines()[-1]) / 1024, worker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--repeat-list", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from ray.cluster_utils import Cluster

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    images = work / "images"
    images.mkdir()
    tests = sorted((DATA / "test").glob("*/*.png"))
    for r in range(args.repeat_list):
        for p in tests:
            (images / f"r{r}_{p.parent.name}_{p.name}").symlink_to(p)
    n = len(tests) * args.repeat_list
    model = work / "model.spade"
    SPADE(k=args.k).fit(DATA / "train" / "good").save(model)
    print(f"{n} inputs, model k={args.k}, {os.cpu_count()} CPUs", flush=True)

    store = 200 * 2**20
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=1, object_store_memory=store)
    cluster.wait_for_nodes()

    base = [sys.executable, "-m", "spade_ad.cli", "predict", str(model), str(images), "--no-overlays"]
    modes = {
        "local (single process)": [],
        "ray, 1 worker, this machine": ["--engine", "ray", "--num-workers", "1"],
        "ray, 2 workers, this machine": ["--engine", "ray", "--num-workers", "2"],
        "ray, 2-node local cluster (2 workers)": ["--engine", "ray", "--address", cluster.address],
    }
    rows = {}
    try:
        for rep in range(args.repeats):
            for name, extra in modes.items():
                out = work / f"out-{rep}-{len(rows)}-{abs(hash(name))}"
                wall, rss, worker = timed([*base, "--out", str(out), *extra])
                rows.setdefault(name, []).append((wall, rss, worker))
                print(f"  {name}: {wall:.1f} s, RSS {rss:.0f} MB, worker {worker:.0f} MB", flush=True)
    finally:
        cluster.shutdown()
    local_wall = statistics.median(w for w, _, _ in rows["local (single process)"])
    local_rss = statistics.median(r for _, r, _ in rows["local (single process)"])
    print()
    print(
        "| mode | wall s (median, incl. start-up) | images/s | vs local | Ray overhead ms/img "
        "| peak RSS per worker MB | vs local RSS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in rows.items():
        wall = statistics.median(w for w, _, _ in runs)
        is_local = name.startswith("local")
        rss = local_rss if is_local else statistics.median(wk for _, _, wk in runs)
        over = "-" if is_local else f"{(wall - local_wall) / n * 1000:.0f}"
        print(
            f"| {name} | {wall:.1f} | {n / wall:.2f} | {local_wall / wall:.2f}x | {over} | {rss:.0f} | "
            f"{rss / local_rss:.2f}x |"
        )


if __name__ == "__main__":
    main()
