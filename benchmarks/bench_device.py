"""CPU against GPU for the same images: scores (must agree to 1e-4 relative) and s/img per stage.

    .venv/bin/python benchmarks/bench_device.py [--preset paper] [--n 40]

Fits the preset on transistor's training images (on the CPU), then predicts ``--n`` test images with
``device="cpu"`` and, when torch sees a CUDA GPU, with ``device="cuda"``: prints the largest relative
difference of image scores and anomaly maps, and the stage split of each (decode+resize, backbone, kNN,
pixel search, upsample+smooth, write). Without a GPU it prints the CPU figures and says so; nothing here
needs a GPU.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_throughput import DATA, stage_split  # the same stage timing as the throughput benchmark

from spade_ad import SPADE
from spade_ad.data import load_mvtec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    ds = load_mvtec(DATA, "transistor")
    test = [t.path for t in ds.test][:: max(1, len(ds.test) // args.n)][: args.n]
    tmp = Path(tempfile.mkdtemp(prefix="bench-device-"))
    path = SPADE.from_preset(args.preset).fit(ds.train).save(tmp / "model.safetensors")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"preset {args.preset}, {len(test)} transistor test images; torch {torch.__version__}; GPU: {name}")
    preds, stages = {}, {}
    for dev in devices:
        model = SPADE.load(path, device=dev)
        model.predict(test[:2])  # warm-up
        preds[dev] = model.predict(test)
        out = tmp / dev
        out.mkdir()
        stages[dev] = stage_split(model, test, out)
    keys = list(stages["cpu"])
    print("| device | " + " | ".join(keys) + " | sum |\n|---|" + "---:|" * (len(keys) + 1))
    for dev, st in stages.items():
        print(f"| {dev} | " + " | ".join(f"{st[k]:.4f}" for k in keys) + f" | {sum(st.values()):.4f} |")
    if "cuda" not in preds:
        print("no CUDA GPU here: only the CPU path was measured")
        return
    a, b = preds["cpu"], preds["cuda"]
    rel_s = float(np.max(np.abs(a.image_scores - b.image_scores) / np.abs(a.image_scores)))
    rel_m = float(np.max(np.abs(a.anomaly_maps - b.anomaly_maps)) / np.max(np.abs(a.anomaly_maps)))
    print(f"max relative difference cpu vs cuda: image scores {rel_s:.2e}, maps {rel_m:.2e} (bound 1e-4)")
    if max(rel_s, rel_m) > 1e-4:
        raise SystemExit("cpu and cuda disagree by more than 1e-4 relative")


if __name__ == "__main__":
    main()
