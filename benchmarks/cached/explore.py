"""Evaluate settings on features cached by cache.py: joint levels, gallery of every image, coreset,
sigma and image scores, without re-running the backbone.

    SPADE_SCRATCH=/work/scratch-acc python benchmarks/cached/explore.py DATASET SIZE CROP full|subset 'JSON'

JSON is a list of settings, e.g. ``[{"levels": [2, 3], "patch": 5, "joint": true, "coreset": 0.1,
"sigmas": [5, 8]}]`` ("gallery": "knn" for the 50 nearest images instead of every image; "proj": the
coreset's projection width; "reweight": also PatchCore's re-weighted image score). Prints one JSON line
per setting and sigma: pixel AUROC, PRO, the image AUROC of each image score, coreset seconds and
search seconds per test image. The same computations as the library (its own functions), on cached
features; a scratch tool for choosing settings, not part of the library.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spade_ad.coreset import coreset_size, greedy_kcenter, project
from spade_ad.data import load_mvtec
from spade_ad.evaluate import load_masks
from spade_ad.features import joint_levels
from spade_ad.maps import combine_levels, smooth
from spade_ad.metrics import image_auroc, pixel_auroc, pro_auc
from spade_ad.search import knn_images, nearest_neighbors, window_search

DATA = Path(__file__).resolve().parents[3] / "shared" / "datasets"
SCRATCH = Path(os.environ.get("SPADE_SCRATCH", "/work/scratch-acc"))
name, size, crop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
subset = len(sys.argv) > 4 and sys.argv[4] == "subset"
configs = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
root = DATA / "mvtec_ad" if name == "transistor" else DATA
ds = load_mvtec(root, name)
pre = SCRATCH / f"{name}_{size}_{crop}_subset.pt"
cache = torch.load(pre if subset and pre.exists() else SCRATCH / f"{name}_{size}_{crop}.pt")
gtr, lvtr = cache["train"]
gte, lvte = cache["test"]
if subset and pre.exists():
    ds.train = ds.train[::4]
    ds.test = ds.test[::3]
elif subset:
    ds.train = ds.train[::4]
    ds.test = ds.test[::3]
    gtr, lvtr = gtr[::4], [lvl[::4] for lvl in lvtr]
    gte, lvte = gte[::3], [lvl[::3] for lvl in lvte]
labels = np.array([t.label for t in ds.test])
defects = [t.defect for t in ds.test]
masks = load_masks(ds, size, crop)
torch.set_num_threads(2)


def feats(lv, levels, patch, joint):
    ch = [lv[lvl - 1].float() for lvl in levels]
    # patch: one size for every level, or a list with one size per level.
    sizes = patch if isinstance(patch, list) else [patch] * len(ch)
    ch = [
        F.avg_pool2d(c, p, 1, p // 2, count_include_pad=False) if p > 1 else c for c, p in zip(ch, sizes, strict=True)
    ]
    if joint:
        ch = [joint_levels(ch)]
    return [c.permute(0, 2, 3, 1).contiguous() for c in ch]


def run(cfg):
    for sg in cfg.get("sigmas", [cfg.get("sigma")]):
        run1(dict(cfg, sigma=sg))


_lm_cache = {}


def run1(cfg):
    levels, patch, joint, coreset, sigma = cfg["levels"], cfg["patch"], cfg["joint"], cfg.get("coreset"), cfg["sigma"]
    gallery = cfg.get("gallery", "all")
    key = json.dumps(
        [
            levels,
            patch,
            joint,
            coreset,
            cfg.get("gallery", "all"),
            cfg.get("proj", 128),
            cfg.get("k", 50),
            cfg.get("window"),
        ]
    )
    if key in _lm_cache:
        all_lm, fit_s, pred_s, pcw = _lm_cache[key]
        return finish(cfg, all_lm, fit_s, pred_s, pcw, sigma)
    tr, te = feats(lvtr, levels, patch, joint), feats(lvte, levels, patch, joint)
    t0 = time.time()
    mems = []
    for lvl in tr:
        flat = lvl.reshape(-1, lvl.shape[-1])
        if coreset:
            keep = greedy_kcenter(project(flat, 0, cfg.get("proj", 128)), coreset_size(len(flat), coreset), seed=0)
            flat = flat[keep]
        mems.append(flat)
    fit_s = time.time() - t0
    _d2, nb = knn_images(gte, gtr, cfg.get("k", 50))  # "k": the pixel gallery's nearest images
    t0 = time.time()
    all_lm, pcw = [], []
    for i in range(len(labels)):
        lm = []
        for j, lvl in enumerate(te):
            h, w, c = lvl.shape[1:]
            q = lvl[i].reshape(-1, c)
            if cfg.get("window") is not None:  # "window": R, the local-window search on the k-image gallery
                d, idx = window_search(lvl[i], tr[j][nb[i]], cfg["window"])
            elif gallery == "all":
                d, idx = nearest_neighbors(q, mems[j])
            else:
                d, idx = nearest_neighbors(q, tr[j][nb[i]].reshape(-1, c))
            lm.append(d.reshape(h, w))
            if j == 0 and gallery == "all" and cfg.get("reweight"):
                a = int(torch.argmax(d))
                m_star = mems[j][idx[a]]
                dd = torch.cdist(m_star[None], mems[j])[0]
                sup = torch.topk(dd, 9, largest=False).indices
                dist = torch.cdist(q[a][None], mems[j][sup])[0]
                wgt = 1 - torch.softmax(dist, 0)[0]
                pcw.append(float(wgt * d[a]))
        all_lm.append(lm)
    pred_s = (time.time() - t0) / len(labels)
    _lm_cache[key] = (all_lm, fit_s, pred_s, pcw)
    finish(cfg, all_lm, fit_s, pred_s, pcw, sigma)


def finish(cfg, all_lm, fit_s, pred_s, pcw, sigma):
    d2, _nb = knn_images(gte, gtr, 50)
    knn5 = d2[:, :5].mean(1).numpy()
    pmax = [max(float(m.max()) for m in lm) for lm in all_lm]
    maps = np.stack([smooth(combine_levels(lm, crop).numpy(), sigma) for lm in all_lm])
    mm = maps.reshape(len(maps), -1).max(1)
    scores = {"knn5": knn5, "map_max": mm, "knn5*map_max": np.sqrt(knn5) * mm, "patch_max": np.array(pmax)}
    if pcw:
        scores["patchcore"] = np.array(pcw)
    pix, pro = pixel_auroc(masks, maps), pro_auc(masks, maps)
    img = {k: round(image_auroc(labels, v), 4) for k, v in scores.items()}
    out = {
        "cfg": cfg,
        "pixel": round(pix, 4),
        "pro": round(pro, 4),
        "img": img,
        "fit_s": round(fit_s, 1),
        "search_s_img": round(pred_s, 3),
    }
    if name == "magnetic_tile" and cfg.get("per_defect"):
        per = {}
        for dname in sorted(set(defects) - {"good"}):
            sel = np.array([d in (dname, "good") for d in defects])
            per[dname] = {"img": round(image_auroc(labels[sel], scores["knn5*map_max"][sel]), 4)}
        out["per_defect"] = per
    print(json.dumps(out), flush=True)


for cfg in configs:
    run(cfg)
