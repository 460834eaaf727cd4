"""Load test of ``spade-ad serve`` on loopback: latency percentiles, throughput, errors and lost requests
with and without micro-batching, then a flood against a small queue (503s, no crash, bounded memory).

    python benchmarks/bench_service.py [--model MODEL] [--clients 8] [--requests 100]

Without --model it fits the paper's settings on transistor/train/good (all 213 images) first. Each mode
starts its own server process (``python -m spade_ad.cli serve``), warms it up, then runs ``--clients``
threads that each send ``--requests`` transistor test images one after another (multipart, keep-alive)
and time every answer. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_ad" / "transistor"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def serve(model: Path, *options: str):
    """A server process on a free loopback port; yields (base URL, process) once /readyz says ready."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "spade_ad.cli",
        "serve",
        str(model),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *options,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read()}")
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t0 > 180:
                raise SystemExit("server not ready after 180 s")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Run:
    """What the clients saw."""

    planned: int
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    mismatched: int = 0  # an answer naming another request's image
    transport_errors: int = 0
    seconds: float = 0.0

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        return self.answered - self.statuses.get(200, 0) + self.mismatched + self.transport_errors

    @property
    def lost(self) -> int:
        """Requests sent that got no HTTP answer at all."""
        return self.planned - self.answered


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]  # nearest rank


def load(base: str, images: list[tuple[str, bytes]], clients: int, requests: int) -> Run:
    """``clients`` threads, each sending ``requests`` images back to back on one keep-alive connection."""
    run = Run(planned=clients * requests)
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(c: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            start.wait()
            for r in range(requests):
                name, data = images[(c * requests + r) % len(images)]
                label = f"c{c}_r{r}_{name}"
                t0 = time.perf_counter()
                try:
                    resp = http.post("/v1/score", files={"file": (label, data, "image/png")})
                except httpx.HTTPError:
                    with lock:
                        run.transport_errors += 1
                    continue
                ms = (time.perf_counter() - t0) * 1000
                ok = resp.status_code != 200 or resp.json()["name"] == label
                with lock:
                    run.statuses[resp.status_code] = run.statuses.get(resp.status_code, 0) + 1
                    run.latencies_ms.append(ms)
                    run.mismatched += not ok

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    run.seconds = time.perf_counter() - t0
    return run


def flood(base: str, proc: subprocess.Popen, image: bytes, clients: int) -> dict:
    """``clients`` requests released at once against a small queue: count 200s and 503s, check the server."""
    barrier = threading.Barrier(clients)
    rss_before = _rss_mb(proc.pid)

    def one(i: int) -> int | str:
        barrier.wait()
        try:
            return httpx.post(
                base + "/v1/score", files={"file": (f"f{i}.png", image, "image/png")}, timeout=120
            ).status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        codes = list(pool.map(one, range(clients)))
    alive = httpx.get(base + "/healthz", timeout=10).status_code == 200 and proc.poll() is None
    after = httpx.post(base + "/v1/score", files={"file": ("after.png", image, "image/png")}, timeout=120)
    return {
        "codes": codes,
        "alive": alive,
        "after": after.status_code,
        "rss_before": rss_before,
        "rss_after": _rss_mb(proc.pid),
        "stats": httpx.get(base + "/v1/stats", timeout=10).json(),
    }


@dataclass
class Measured:
    """One timed run of one mode, with the server's batching counters over it."""

    mode: str
    run: Run
    mean_batch: float
    busy_s: float

    @property
    def p50(self) -> float:
        return statistics.median(self.run.latencies_ms)

    @property
    def rps(self) -> float:
        return self.run.answered / self.run.seconds


def measure(mode: str, base: str, images: list[tuple[str, bytes]], clients: int, requests: int) -> Measured:
    before = httpx.get(base + "/v1/stats").json()
    run = load(base, images, clients, requests)
    after = httpx.get(base + "/v1/stats").json()
    batches = after["batches"] - before["batches"]
    mean_batch = (after["images"] - before["images"]) / batches if batches else float("nan")
    return Measured(mode, run, mean_batch, after["busy_seconds"] - before["busy_seconds"])


def _row(label: str, ms: list[Measured]) -> str:
    """One table row; with several runs, each figure is the median over them (errors and lost: totals)."""
    med = statistics.median
    lat = [m.run.latencies_ms for m in ms]
    return (
        f"| {label} | {sum(m.run.planned for m in ms)} | {sum(m.run.errors for m in ms)} | "
        f"{sum(m.run.lost for m in ms)} | {med(m.p50 for m in ms):.0f} | "
        f"{med(_percentile(x, 95) for x in lat):.0f} | {med(_percentile(x, 99) for x in lat):.0f} | "
        f"{med(m.rps for m in ms):.2f} | {med(m.mean_batch for m in ms):.2f} | "
        f"{med(m.busy_s / m.run.answered * 1000 for m in ms):.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="Fitted model file (default: fit on --data).")
    ap.add_argument("--data", type=Path, default=DATA, help="MVTec category folder (default: transistor).")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=100, help="Requests per client and run.")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="Runs per mode, alternating the modes (the table shows medians over the runs).",
    )
    ap.add_argument("--warmup", type=int, default=4, help="Requests sent to each server before timing starts.")
    ap.add_argument("--flood-clients", type=int, default=48)
    ap.add_argument("--flood-queue", type=int, default=4)
    ap.add_argument("--torch-threads", type=int, default=None, help="Passed to the servers (default: torch's).")
    args = ap.parse_args()

    load_start = os.getloadavg()[0]  # other work on the machine skews the figures: say how much there was
    test_images = sorted((args.data / "test").glob("*/*.png"))
    if not test_images:
        raise SystemExit(f"{args.data / 'test'}: no test images")
    images = [(f"{p.parent.name}_{p.name}", p.read_bytes()) for p in test_images]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from spade_ad import SPADE

            t0 = time.perf_counter()
            fitted = SPADE().fit(args.data / "train" / "good")
            model = fitted.save(Path(tmp) / "model.spade")
            print(f"fitted on {len(fitted.train_paths_)} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        extra = [] if args.torch_threads is None else ["--torch-threads", str(args.torch_threads)]
        modes = [
            ("micro-batching (--max-batch 8 --batch-wait-ms 5)", ["--max-batch", "8", "--batch-wait-ms", "5"]),
            ("no batching (--max-batch 1 --batch-wait-ms 0)", ["--max-batch", "1", "--batch-wait-ms", "0"]),
        ]
        runs: dict[str, list[Measured]] = {label: [] for label, _ in modes}
        # Both servers stay up and the modes alternate, so a burst of other load on the machine hits both.
        with serve(model, *modes[0][1], *extra) as (base_a, _), serve(model, *modes[1][1], *extra) as (base_b, _):
            bases = {modes[0][0]: base_a, modes[1][0]: base_b}
            for base in bases.values():
                load(base, images, 1, args.warmup)
            for r in range(args.repeat):
                for label, base in bases.items():
                    m = measure(label, base, images, args.clients, args.requests)
                    runs[label].append(m)
                    print(
                        f"run {r + 1}, {label}: {m.run.seconds:.1f} s, {m.rps:.2f} req/s, p50 {m.p50:.0f} ms, "
                        f"errors {m.run.errors} {m.run.statuses}",
                        file=sys.stderr,
                    )
        with serve(model, "--queue-size", str(args.flood_queue), *extra) as (base, proc):
            fl = flood(base, proc, images[0][1], args.flood_clients)

    print(
        f"\n{args.clients} concurrent clients x {args.requests} requests each, {args.repeat} run(s) per mode "
        f"({len(images)} transistor test images, 256x256 PNG, multipart), loopback, {os.cpu_count()} CPU cores; "
        f"load average (1 min) at start / end {load_start:.2f} / {os.getloadavg()[0]:.2f}\n"
    )
    header = (
        "| mode | requests | errors | lost | p50 ms | p95 ms | p99 ms | req/s | mean batch | model ms/image |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    print(header)
    for label, ms in runs.items():
        print(_row(label, ms))
    if args.repeat > 1:
        print("\nEach run:\n")
        print(header)
        for label, ms in runs.items():
            for i, m in enumerate(ms):
                print(_row(f"{label}, run {i + 1}", [m]))
    bad = [(label, m.run) for label, ms in runs.items() for m in ms if m.run.errors]
    if bad:
        print(
            "\nerror statuses: "
            + "; ".join(
                f"{label}: {run.statuses}, transport errors {run.transport_errors}, mismatched {run.mismatched}"
                for label, run in bad
            )
        )
    codes = fl["codes"]
    other = [c for c in codes if c not in (200, 503)]
    print(f"\nFlood: {args.flood_clients} requests at once, --queue-size {args.flood_queue}\n")
    print("| answered 200 | answered 503 | other | server alive after | next request | server RSS before / after |")
    print("|---:|---:|---:|---|---:|---|")
    print(
        f"| {codes.count(200)} | {codes.count(503)} | {len(other)} {other or ''} | "
        f"{'yes' if fl['alive'] else 'NO'} | {fl['after']} | {fl['rss_before']:.0f} / {fl['rss_after']:.0f} MB |"
    )


if __name__ == "__main__":
    main()
