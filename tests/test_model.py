"""The SPADE estimator: the method against brute force, save/load, shapes and configuration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from spade_ad import SPADE, NotFittedError, SpadeError

SMALL = {"image_size": 48, "crop_size": 48, "k": 2}


def brute_force_maps(test_levels, train_levels, neighbors, crop, sigma):
    """Per-pixel maps with explicit double loops over test pixels and gallery features.

    Independent of the library's search: for every test pixel at every level, the plain Euclidean
    distance to the nearest feature among all pixels of the K neighbour images; levels upsampled
    bilinearly, averaged, then Gaussian-smoothed.
    """
    maps = []
    for i, nb in enumerate(neighbors):
        ups = []
        for t_lv, b_lv in zip(test_levels, train_levels, strict=True):
            t = t_lv[i].double().numpy()  # (C, h, w)
            gal = b_lv[nb].double().numpy()  # (K, C, h, w)
            _, h, w = t.shape
            gal_pts = [gal[n, :, yy, xx] for n in range(gal.shape[0]) for yy in range(h) for xx in range(w)]
            out = np.empty((h, w))
            for y in range(h):
                for x in range(w):
                    out[y, x] = min(np.sqrt(np.sum((t[:, y, x] - p) ** 2)) for p in gal_pts)
            up = F.interpolate(
                torch.from_numpy(out)[None, None], size=(crop, crop), mode="bilinear", align_corners=False
            )
            ups.append(up[0, 0].numpy())
        maps.append(gaussian_filter(np.mean(ups, axis=0), sigma=sigma))
    return np.stack(maps)


def test_maps_match_brute_force(image_dirs):
    train, test = image_dirs
    model = SPADE(**SMALL).fit(train)
    out = model.predict(test)
    g_train, lv_train = model.extract(train)
    g_test, lv_test = model.extract(test)
    # Image level: mean squared distance to the k nearest training global features.
    d2 = ((g_test.double()[:, None] - g_train.double()[None]) ** 2).sum(-1).numpy()
    order = np.argsort(d2, axis=1, kind="stable")[:, : model.k]
    np.testing.assert_array_equal(out.neighbors, order)
    np.testing.assert_allclose(out.image_scores, np.take_along_axis(d2, order, 1).mean(1), rtol=1e-5)
    # Pixel level, on exactly the features extract() returns.
    want = brute_force_maps(lv_test, lv_train, out.neighbors, 48, 4.0)
    rel = np.abs(out.anomaly_maps - want).max() / np.abs(want).max()
    assert rel < 1e-4, rel
    np.testing.assert_allclose(out.anomaly_maps, want, rtol=1e-4)


def test_defect_scores_higher_where_the_defect_is(image_dirs):
    train, test = image_dirs
    out = SPADE(**SMALL).fit(train).predict(sorted(test.iterdir()))
    names = [n.split("/")[-1] for n in out.names]
    good = names.index("good_0.png")
    bad = [names.index("bad_0.png"), names.index("bad_1.png")]
    assert all(out.image_scores[b] > out.image_scores[good] for b in bad)
    # The defect square is at rows 16..24, cols 24..32 of the 48x48 image: the map peaks near it.
    for b in bad:
        y, x = np.unravel_index(np.argmax(out.anomaly_maps[b]), (48, 48))
        assert 10 <= y <= 30 and 18 <= x <= 38, (y, x)


def test_output_types_and_shapes(image_dirs):
    train, test = image_dirs
    model = SPADE(**SMALL).fit(train)
    out = model.predict(test)
    assert out.image_scores.shape == (3,) and out.image_scores.dtype == np.float64
    assert out.anomaly_maps.shape == (3, 48, 48) and out.anomaly_maps.dtype == np.float32
    assert out.neighbors.shape == (3, 2) and out.neighbors.dtype == np.int64
    assert out.neighbors.max() < 6
    g, levels = model.extract(test)
    assert g.shape == (3, 1280)
    assert [tuple(lv.shape) for lv in levels] == [(3, 24, 12, 12), (3, 40, 6, 6), (3, 112, 3, 3)]
    # levels follow the order of `levels`
    _, lv2 = SPADE(levels=(3, 1), **SMALL).fit(train).extract(test)
    assert [tuple(lv.shape[1:2]) for lv in lv2] == [(112,), (24,)]
    assert torch.equal(lv2[0], levels[2]) and torch.equal(lv2[1], levels[0])


def test_default_parameters_are_the_papers():
    m = SPADE()
    assert (m.backbone, m.k, m.kappa, tuple(m.levels), m.sigma, m.image_size, m.crop_size) == (
        "efficientnet_lite0",
        50,
        1,
        (1, 2, 3),
        4.0,
        256,
        224,
    )


def test_fit_returns_self_and_init_only_stores(image_dirs):
    train, _ = image_dirs
    m = SPADE(k=-3)  # __init__ validates nothing ...
    assert m.k == -3
    with pytest.raises(SpadeError, match="k must be a positive integer"):
        m.fit(train)  # ... fit does
    m2 = SPADE(**SMALL)
    assert m2.fit(train) is m2
    assert len(m2.train_paths_) == 6 and m2.train_paths_[0].endswith("n00.png")


def test_predict_before_fit():
    with pytest.raises(NotFittedError):
        SPADE().predict(np.zeros((1, 8, 8, 3), dtype=np.uint8))


def test_save_load_bit_for_bit(image_dirs, tmp_path):
    train, test = image_dirs
    model = SPADE(sigma=2.0, levels=(1, 3), **SMALL).fit(train)
    out = model.predict(test)
    path = model.save(tmp_path / "m.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    model2 = SPADE.load(path)
    out2 = model2.predict(test)
    assert np.array_equal(out.anomaly_maps, out2.anomaly_maps)
    assert np.array_equal(out.image_scores, out2.image_scores)
    assert np.array_equal(out.neighbors, out2.neighbors)
    assert (model2.k, model2.kappa, tuple(model2.levels), model2.sigma) == (2, 1, (1, 3), 2.0)
    assert model2.train_paths_ == model.train_paths_


def test_model_file_carries_its_configuration(image_dirs, tmp_path):
    from safetensors import safe_open

    train, _ = image_dirs
    model = SPADE(**SMALL).fit(train)
    path = model.save(tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    cfg = json.loads(meta["config"])
    assert keys == {"global", "level0", "level1", "level2"}
    assert cfg["backbone"] == "efficientnet_lite0" and len(cfg["weights_sha256"]) == 64
    assert (cfg["k"], cfg["kappa"], cfg["levels"], cfg["sigma"]) == (2, 1, [1, 2, 3], 4.0)
    assert cfg["preprocessing"]["image_size"] == 48 and cfg["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert cfg["package_version"]
    assert [p.split("/")[-1] for p in json.loads(meta["train_files"])] == [f"n{i:02d}.png" for i in range(6)]


def test_array_input_matches_file_input(image_dirs):
    from PIL import Image

    train, test = image_dirs
    model = SPADE(**SMALL).fit(train)
    files = sorted(test.iterdir())
    arrays = np.stack([np.asarray(Image.open(p)) for p in files])
    a = model.predict(files)
    b = model.predict(arrays)
    np.testing.assert_array_equal(a.anomaly_maps, b.anomaly_maps)
    assert b.names == ["array[0]", "array[1]", "array[2]"]


def test_reference_formula_is_wrong_on_current_torch_and_ours_is_not():
    """The popular reference code's per-pixel distance, run on today's torch, is not a per-pixel distance.

    It calls ``torch.pairwise_distance(gallery (G, C, 1, 1), test (1, C, H, W))``; since torch 1.12
    that reduces over the last axis (W) instead of channels (its issues 13, 15, 18). Ours matches the
    brute-force double loop.
    """
    from spade_ad.search import nearest_distances

    rng = np.random.default_rng(5)
    c, h, w = 6, 4, 5
    test = torch.from_numpy(rng.normal(size=(1, c, h, w)).astype(np.float32))
    gallery_maps = torch.from_numpy(rng.normal(size=(2, c, h, w)).astype(np.float32))
    feat_gallery = gallery_maps.transpose(3, 1).flatten(end_dim=2).unsqueeze(-1).unsqueeze(-1)
    ref = torch.min(torch.pairwise_distance(feat_gallery, test), dim=0)[0]
    pts = gallery_maps.permute(0, 2, 3, 1).reshape(-1, c).double().numpy()
    t = test[0].double().numpy()
    brute = np.array([[np.sqrt(((pts - t[:, y, x]) ** 2).sum(1)).min() for x in range(w)] for y in range(h)])
    assert ref.shape != (h, w) or not np.allclose(ref.numpy(), brute, rtol=1e-3)
    ours = nearest_distances(test[0].permute(1, 2, 0).reshape(-1, c), gallery_maps.permute(0, 2, 3, 1).reshape(-1, c))
    np.testing.assert_allclose(ours.reshape(h, w).numpy(), brute, rtol=1e-5)


def test_explanations_point_at_the_nearest_normal_feature(image_dirs):
    train, test = image_dirs
    model = SPADE(**SMALL).fit(train)
    (e,) = model.explain([min(test.iterdir())])
    _, lv_train = model.extract(train)
    _, lv_test = model.extract([min(test.iterdir())])
    t = lv_test[0][0].double()  # (C, 12, 12): finest level, stride 4
    b = lv_train[0].double()  # (6, C, 12, 12)
    assert e.level == 1 and e.stride == 4 and e.source_image.shape == (12, 12)
    assert set(np.unique(e.source_image)) <= set(e.neighbors.tolist())
    gallery = b[e.neighbors].permute(0, 2, 3, 1).reshape(-1, b.shape[1])
    for y in range(12):
        for x in range(12):
            matched = b[e.source_image[y, x], :, e.source_y[y, x], e.source_x[y, x]]
            d = float(torch.linalg.vector_norm(t[:, y, x] - matched))
            best = float(torch.linalg.vector_norm(gallery - t[:, y, x], dim=1).min())
            assert d == pytest.approx(best, rel=1e-5) and e.distance[y, x] == pytest.approx(best, rel=1e-5)


def test_a_training_image_is_rebuilt_from_itself(image_dirs):
    from spade_ad.viz import rebuild_from_matches

    train, _ = image_dirs
    model = SPADE(**SMALL).fit(train)
    (e,) = model.explain([sorted(train.iterdir())[2]])
    # Not exactly 0: convolution kernels differ with batch size (1 here, 6 at fit), ~1e-5 apart.
    assert e.distance.max() < 1e-3 and np.all(e.source_image == 2)
    np.testing.assert_array_equal(rebuild_from_matches(e, model.train_image), model.train_image(2))
