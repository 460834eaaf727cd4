"""The operator loop on the full transistor training set: what one "mark as normal" does to scores, and
what an add costs (library and over HTTP).

    python benchmarks/bench_operator_loop.py [--data ../shared/datasets/mvtec_ad/transistor] [--repeat 5]

1. Fits the paper's settings on transistor train/good with 10 % held out (``fit(calibrate=0.1)``), then
   for image_k = 50 (the paper), 5 and 1 (opt-in) re-calibrates the same bank on the same held-out images.
   For each: the 10 bent_lead test images are scored; bent_lead/000 is added as normal; all 10 are scored
   again. Printed: its score / threshold before and after, and how many of the other 9 are flagged.
2. Times ``add_normal`` of one image and ``save`` of the grown model (medians of --repeat runs).
3. Starts ``spade-ad serve --admin-token-file`` on the image_k=1 model and times POST /v1/normal
   round trips (the add, the atomic save with fsync, the audit line) and /v1/score meanwhile idle.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from bench_service import serve  # benchmarks/ is on sys.path when this script runs

from spade_ad import SPADE
from spade_ad.thresholds import split_holdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets/mvtec_ad/transistor"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    train = sorted(str(p) for p in (args.data / "train" / "good").glob("*.png"))
    bent = sorted(str(p) for p in (args.data / "test" / "bent_lead").glob("*.png"))
    keep, hold = split_holdout(train, 0.1)
    t0 = time.perf_counter()
    base = SPADE().fit(keep)
    print(f"fitted on {len(keep)} images ({len(hold)} held out) in {time.perf_counter() - t0:.1f} s")

    print(
        "\n| image_k | threshold | bent_lead/000 score / threshold: before | after | other 9 flagged: before | after |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    models = {}
    for image_k in (None, 5, 1):
        m = copy.copy(base)
        m.image_k = image_k
        m.image_k_ = min(image_k or m.k, len(m.train_paths_))
        m.calibrate(hold)
        th = m.thresholds_.image
        before = m.predict(bent, segment_above=float("inf")).image_scores
        grown = copy.copy(m).add_normal([bent[0]])
        after = grown.predict(bent, segment_above=float("inf")).image_scores
        print(
            f"| {image_k or 50}{' (paper)' if image_k is None else ''} | {th:.2f} | {before[0] / th:.3f} | "
            f"{after[0] / th:.3f} | {(before[1:] >= th).sum()} | {(after[1:] >= th).sum()} |"
        )
        models[image_k] = m

    m = models[1]
    add_s, save_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            grown = copy.copy(m).add_normal([bent[0]])
            add_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            grown.save(Path(tmp) / "grown.spade")
            save_s.append(time.perf_counter() - t0)
        size_mb = (Path(tmp) / "grown.spade").stat().st_size / 1e6
        print(
            f"\nlibrary, {len(m.train_paths_)}-image bank: add_normal(1 image) {statistics.median(add_s):.3f} s, "
            f"save {statistics.median(save_s):.3f} s ({size_mb:.0f} MB file); medians of {args.repeat}"
        )

        model_file = m.save(Path(tmp) / "live.spade")
        token = Path(tmp) / "token"
        token.write_text(os.urandom(24).hex())
        options = ["--admin-token-file", str(token), "--admin-max-per-minute", "1000"]
        with serve(model_file, *options) as (base_url, _):  # bench_service's server, ready on a free port
            headers = {"Content-Type": "image/png", "Authorization": f"Bearer {token.read_text()}"}
            adds, scores = [], []
            for path in bent[1 : 1 + args.repeat]:
                body = Path(path).read_bytes()
                t0 = time.perf_counter()
                r = httpx.post(base_url + "/v1/normal", content=body, headers=headers, timeout=120)
                adds.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
                t0 = time.perf_counter()
                r = httpx.post(base_url + "/v1/score", content=body, headers={"Content-Type": "image/png"}, timeout=120)
                scores.append(time.perf_counter() - t0)
                assert r.status_code == 200 and r.json()["image_score"] < 1e-6, r.text
            print(
                f"service: POST /v1/normal {statistics.median(adds):.3f} s (saved + audited before the answer), "
                f"then POST /v1/score of the same image {statistics.median(scores):.3f} s, score 0; "
                f"medians of {args.repeat}"
            )


if __name__ == "__main__":
    main()
