"""PatchCore-style options: joint multi-level features, the gallery of every training image and its
greedy k-center coreset. Each against an independent brute-force reference on small inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image

from spade_ad import SPADE, ModelFileError, SpadeError
from spade_ad.coreset import coreset_size, greedy_kcenter, project

SMALL = {"image_size": 48, "crop_size": 48, "k": 2}


def bilinear_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """(C, h0, w0) -> (C, h, w): bilinear with half-pixel centres (align_corners=False), written out
    with explicit source coordinates, clamped at the borders."""
    c, h0, w0 = x.shape
    out = np.empty((c, h, w))
    for y in range(h):
        sy = max((y + 0.5) * h0 / h - 0.5, 0.0)
        y0 = min(int(np.floor(sy)), h0 - 1)
        y1, fy = min(y0 + 1, h0 - 1), sy - y0
        for xx in range(w):
            sx = max((xx + 0.5) * w0 / w - 0.5, 0.0)
            x0 = min(int(np.floor(sx)), w0 - 1)
            x1, fx = min(x0 + 1, w0 - 1), sx - x0
            top = (1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1]
            bottom = (1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]
            out[:, y, xx] = (1 - fy) * top + fy * bottom
    return out


def naive_kcenter(x: np.ndarray, n: int, first: int) -> list[int]:
    """Greedy k-center, one selection at a time, float64, every distance recomputed."""
    chosen = [first]
    while len(chosen) < n:
        d = np.min([np.sqrt(((x - x[c]) ** 2).sum(1)) for c in chosen], axis=0)
        chosen.append(int(np.argmax(d)))
    return chosen


@pytest.fixture(scope="module")
def arrays():
    from conftest import make_image

    rng = np.random.default_rng(0)
    train = np.stack([make_image(rng) for _ in range(5)])
    test = np.stack([make_image(rng, defect=True), make_image(rng)])
    return train, test


def test_joint_features_are_the_upsampled_levels_concatenated(arrays):
    train, _ = arrays
    _, separate = SPADE(levels=(1, 2, 3), patch_size=3, **SMALL).extract(train[:2])
    _, joint = SPADE(levels=(1, 2, 3), patch_size=3, joint_levels=True, **SMALL).extract(train[:2])
    assert len(joint) == 1
    h, w = separate[0].shape[-2:]
    assert joint[0].shape == (2, sum(s.shape[1] for s in separate), h, w)
    for i in range(2):
        want = np.concatenate([bilinear_resize(s[i].double().numpy(), h, w) for s in separate])
        np.testing.assert_allclose(joint[0][i].numpy(), want, rtol=1e-5, atol=1e-5)


def box_mean(x: np.ndarray, p: int) -> np.ndarray:
    """(C, h, w): each position the plain mean of the p x p window around it, over the positions that
    exist (a written-out reference for the library's border-aware averaging)."""
    c, h, w = x.shape
    out = np.empty((c, h, w))
    r = p // 2
    for y in range(h):
        for xx in range(w):
            out[:, y, xx] = x[:, max(y - r, 0) : y + r + 1, max(xx - r, 0) : xx + r + 1].mean(axis=(1, 2))
    return out


def test_per_level_patch_sizes_average_each_level_by_its_own_size(arrays, tmp_path):
    train, test = arrays
    _, plain = SPADE(levels=(2, 3), **SMALL).extract(train[:2])
    _, mixed = SPADE(levels=(2, 3), patch_size=(3, 5), **SMALL).extract(train[:2])
    for lv, p, got in zip(plain, (3, 5), mixed, strict=True):
        for i in range(2):
            want = box_mean(lv[i].double().numpy(), p)
            np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-5, atol=1e-5)
    # Joint: each level averaged by its own size, then upsampled and concatenated.
    _, joint = SPADE(levels=(2, 3), patch_size=(3, 5), joint_levels=True, **SMALL).extract(train[:2])
    h, w = plain[0].shape[-2:]
    want = np.concatenate(
        [bilinear_resize(box_mean(lv[0].double().numpy(), p), h, w) for lv, p in zip(plain, (3, 5), strict=True)]
    )
    np.testing.assert_allclose(joint[0][0].numpy(), want, rtol=1e-5, atol=1e-5)
    # Equal sizes per level are the single size.
    _, same = SPADE(levels=(2, 3), patch_size=(3, 3), **SMALL).extract(train[:2])
    _, single = SPADE(levels=(2, 3), patch_size=3, **SMALL).extract(train[:2])
    for a, b in zip(same, single, strict=True):
        torch.testing.assert_close(a, b)
    # Saved and restored as given.
    m = SPADE(levels=(2, 3), patch_size=(3, 5), joint_levels=True, gallery="all", coreset=0.5, **SMALL).fit(train)
    again = SPADE.load(m.save(tmp_path / "m.safetensors"))
    assert again.patch_size == (3, 5)
    np.testing.assert_array_equal(again.predict(test).anomaly_maps, m.predict(test).anomaly_maps)


@pytest.mark.parametrize("n,d,k,candidates", [(300, 8, 60, 16), (400, 32, 150, 2048), (250, 3, 250, 32)])
def test_coreset_is_the_naive_greedy_k_center(n, d, k, candidates):
    x = torch.randn((n, d), generator=torch.Generator().manual_seed(n + d))
    got = greedy_kcenter(x, k, seed=7, candidates=candidates).tolist()
    assert len(set(got)) == k
    assert got == naive_kcenter(x.double().numpy(), k, got[0])
    assert greedy_kcenter(x, k, seed=7, candidates=candidates).tolist() == got  # seeded: deterministic
    assert greedy_kcenter(x, 5, seed=8)[0] != got[0] or greedy_kcenter(x, 5, seed=9)[0] != got[0]


def test_coreset_size_and_projection():
    assert coreset_size(1000, 0.1) == 100 and coreset_size(7, 0.01) == 1 and coreset_size(10, 1.0) == 10
    x = torch.randn((50, 300), generator=torch.Generator().manual_seed(0))
    p = project(x, seed=3)
    assert p.shape == (50, 128) and torch.equal(p, project(x, seed=3))
    narrow = torch.randn((5, 20))
    assert torch.equal(project(narrow, 0), narrow)
    # Johnson-Lindenstrauss: pairwise distances kept to within a few tens of per cent.
    ratio = torch.pdist(p) / torch.pdist(x)
    assert float(ratio.min()) > 0.6 and float(ratio.max()) < 1.4


def test_gallery_all_matches_every_training_position(arrays):
    train, test = arrays
    model = SPADE(levels=(2, 3), joint_levels=True, gallery="all", sigma=0, **SMALL).fit(train)
    _, tr = model.extract(train)
    _, te = model.extract(test)
    bank = tr[0].permute(0, 2, 3, 1).reshape(-1, tr[0].shape[1]).double()
    for i, e in enumerate(model.explain(test)):
        h, w = te[0].shape[-2:]
        q = te[0][i].permute(1, 2, 0).reshape(-1, te[0].shape[1]).double()
        d = torch.cdist(q, bank)
        want_d, _want_src = d.min(1)
        np.testing.assert_allclose(e.distance.reshape(-1), want_d.numpy(), rtol=1e-5)
        flat = (torch.from_numpy(e.source_image) * h + torch.from_numpy(e.source_y)) * w + torch.from_numpy(e.source_x)
        # The named training image and position hold the nearest feature (up to float32 ties).
        np.testing.assert_allclose(d.gather(1, flat.reshape(-1, 1))[:, 0].numpy(), want_d.numpy(), rtol=1e-5)
        assert e.stride == 8 and e.level == 2
        assert (e.source_image >= 0).all() and (e.source_image < len(train)).all()


def test_coreset_model_uses_the_greedy_selection_and_round_trips(arrays, tmp_path):
    train, test = arrays
    kw = dict(levels=(2, 3), joint_levels=True, gallery="all", coreset=0.25, coreset_seed=3, **SMALL)
    model = SPADE(**kw).fit(train)
    _, tr = model.extract(train)
    flat = tr[0].permute(0, 2, 3, 1).reshape(-1, tr[0].shape[1])
    (keep,) = model.bank_.coresets
    assert len(keep) == coreset_size(len(flat), 0.25)
    assert keep.tolist() == naive_kcenter(project(flat, 3).double().numpy(), len(keep), int(keep[0]))
    # The map is the distance to the nearest kept position, and explanations name kept positions.
    e = model.explain(test[:1])[0]
    h, w = tr[0].shape[-2:]
    src = (e.source_image * h + e.source_y) * w + e.source_x
    assert set(src.reshape(-1).tolist()) <= set(keep.tolist())
    _, te = model.extract(test[:1])
    q = te[0][0].permute(1, 2, 0).reshape(-1, flat.shape[1]).double()
    want = torch.cdist(q, flat[keep].double()).min(1).values.numpy()
    np.testing.assert_allclose(e.distance.reshape(-1), want, rtol=1e-5)
    pred = model.predict(test)
    path = model.save(tmp_path / "m.safetensors")
    for mmap in (False, True):
        back = SPADE.load(path, mmap=mmap)
        assert (back.joint_levels, back.gallery, back.coreset, back.coreset_seed) == (True, "all", 0.25, 3)
        assert torch.equal(back.bank_.coresets[0], keep)
        again = back.predict(test)
        np.testing.assert_array_equal(again.anomaly_maps, pred.anomaly_maps)
        np.testing.assert_array_equal(again.image_scores, pred.image_scores)
    # The same seed and data give the same coreset; the selection is part of the file, not redone.
    assert torch.equal(SPADE(**kw).fit(train).bank_.coresets[0], keep)


def test_per_level_coresets_round_trip(arrays, tmp_path):
    train, test = arrays
    model = SPADE(levels=(2, 3), gallery="all", coreset=0.5, **SMALL).fit(train)
    assert [len(c) for c in model.bank_.coresets] == [
        coreset_size(len(train) * s * s, 0.5) for s in (6, 3)
    ]  # 48 px: 6x6 at stride 8, 3x3 at stride 16
    back = SPADE.load(model.save(tmp_path / "m.safetensors"))
    np.testing.assert_array_equal(back.predict(test).anomaly_maps, model.predict(test).anomaly_maps)


def test_a_tampered_coreset_is_refused(arrays, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from spade_ad.bank import content_sha256

    train, _ = arrays
    path = SPADE(levels=(3,), gallery="all", coreset=0.5, **SMALL).fit(train).save(tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    tensors["coreset0"] = tensors["coreset0"] + 10_000  # out of range, with a valid checksum
    meta["content_sha256"] = content_sha256(tensors, meta["config"], meta["train_files"])
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match="coreset0"):
        SPADE.load(path)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"coreset": 0.1}, "gallery='all'"),
        ({"gallery": "all", "coreset": 0.0}, "fraction"),
        ({"gallery": "all", "coreset": 1.5}, "fraction"),
        ({"gallery": "all", "window": 2}, "gallery='knn'"),
        ({"gallery": "every"}, "gallery must be"),
        ({"joint_levels": "yes"}, "joint_levels"),
        ({"patch_size": (3, 5, 7), "levels": (2, 3)}, "one per level"),
        ({"patch_size": (3, 4), "levels": (2, 3)}, "odd positive"),
        ({"patch_size": (), "levels": (2, 3)}, "odd positive"),
    ],
)
def test_bad_options_are_refused(arrays, kwargs, message):
    with pytest.raises(SpadeError, match=message):
        SPADE(**SMALL, **kwargs).fit(arrays[0])


def test_defaults_stay_the_paper():
    m = SPADE()
    assert (m.joint_levels, m.gallery, m.coreset) == (False, "knn", None)


def test_cli_options_reach_the_model_and_explain_works(image_dirs, tmp_path):
    from click.testing import CliRunner

    from spade_ad.cli import main

    train, test = image_dirs
    out = tmp_path / "m.safetensors"
    args = ["fit", str(train), "--out", str(out), "--image-size", "48", "--crop-size", "48", "--k", "2"]
    flags = ["--levels", "2,3", "--joint-levels", "--pixel-gallery", "all", "--coreset", "0.3", "--coreset-seed", "5"]
    r = CliRunner().invoke(main, [*args, *flags, "--patch-size", "3,5"])
    assert r.exit_code == 0, r.output
    m = SPADE.load(out)
    assert (m.joint_levels, m.gallery, m.coreset, m.coreset_seed) == (True, "all", 0.3, 5)
    assert m.patch_size == (3, 5)
    r = CliRunner().invoke(main, [*args, *flags, "--patch-size", "3,4", "--overwrite"])
    assert r.exit_code == 2 and "odd" in r.output
    r = CliRunner().invoke(main, ["predict", str(out), str(test), "--out", str(tmp_path / "o"), "--explain"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "explain" / "bad_0.png").is_file()
    # A preset's gallery is kept unless --pixel-gallery is given.
    r = CliRunner().invoke(main, [*args, "--preset", "joint-coreset", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert SPADE.load(out).gallery == "all"
    r = CliRunner().invoke(main, [*args, "--preset", "joint-coreset", "--pixel-gallery", "knn", "--overwrite"])
    assert r.exit_code == 2 and "coreset" in r.output  # the preset's coreset needs the gallery of every image


def test_add_and_remove_normal_with_a_coreset_equal_a_refit(tmp_path):
    """The operator loop on a coreset model: the coreset is chosen again, as a fit on the same images would."""
    rng = np.random.default_rng(3)
    images = [make_image(rng) for _ in range(6)]
    kw = {"weights": "random", "image_size": 48, "crop_size": 48, "k": 3, "gallery": "all", "coreset": 0.3}
    grown = SPADE(**kw).fit(images[:4]).add_normal(images[4:])
    refit = SPADE(**kw).fit(images)
    assert grown.bank_.coresets is not None and refit.bank_.coresets is not None
    for a, b in zip(grown.bank_.coresets, refit.bank_.coresets, strict=True):
        assert torch.equal(a, b)
    test = [make_image(rng, defect=True)]
    np.testing.assert_array_equal(grown.predict(test).anomaly_maps, refit.predict(test).anomaly_maps)
    # saved and loaded, the grown model keeps its coreset; removing images chooses it again
    loaded = SPADE.load(grown.save(tmp_path / "grown.spade"))
    np.testing.assert_array_equal(loaded.predict(test).anomaly_maps, refit.predict(test).anomaly_maps)
    shrunk = loaded.remove_normal([4, 5])
    again = SPADE(**kw).fit(images[:4])
    for a, b in zip(shrunk.bank_.coresets, again.bank_.coresets, strict=True):
        assert torch.equal(a, b)
