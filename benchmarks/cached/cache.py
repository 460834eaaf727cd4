"""Cache raw backbone features (all three levels, patch_size 1) of a dataset, for explore.py.

    SPADE_SCRATCH=/work/scratch-acc python benchmarks/cached/cache.py transistor:320:280 magnetic_tile:320:280[:subset]

Each argument is DATASET:IMAGE_SIZE:CROP_SIZE, with ``:subset`` for every 4th training and every 3rd
test image (the real-data test's subset). Writes $SPADE_SCRATCH/<dataset>_<size>_<crop>[_subset].pt
(float16 levels). A scratch tool for choosing settings quickly, not part of the library.
"""

import os
import sys
import time
from pathlib import Path

import torch

from spade_ad import SPADE
from spade_ad.data import load_mvtec

SCRATCH = Path(os.environ.get("SPADE_SCRATCH", "/work/scratch-acc"))
DATA = Path(__file__).resolve().parents[3] / "shared" / "datasets"
ds_map = {"transistor": (DATA / "mvtec_ad", "transistor"), "magnetic_tile": (DATA, "magnetic_tile")}
for spec in sys.argv[1:]:
    name, size, crop, *sub = spec.split(":")
    out = SCRATCH / f"{name}_{size}_{crop}{'_subset' if sub else ''}.pt"
    if out.exists():
        continue
    ds = load_mvtec(*ds_map[name])
    if sub:
        ds.train, ds.test = ds.train[::4], ds.test[::3]
    m = SPADE(image_size=int(size), crop_size=int(crop), levels=(1, 2, 3), batch_size=16)
    t = time.time()
    res = {}
    for split, items in (("train", list(ds.train)), ("test", [x.path for x in ds.test])):
        g, lv = m.extract(items)
        res[split] = (g, [lvl.half() for lvl in lv])
    res["labels"] = [x.label for x in ds.test]
    res["defects"] = [x.defect for x in ds.test]
    res["test_paths"] = [str(x.path) for x in ds.test]
    torch.save(res, out)
    print(spec, time.time() - t, flush=True)
