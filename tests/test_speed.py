"""The speed options: exactness of the tiled search (ties, tile edges), bf16, the local window, float16
and memory-mapped banks, and scoring only flagged images."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spade_ad import SPADE
from spade_ad.bank import MappedLevel
from spade_ad.cli import main
from spade_ad.errors import ModelFileError, SpadeError
from spade_ad.search import Tiles, knn_images, nearest_neighbors, window_distances

SMALL = {"image_size": 48, "crop_size": 48, "k": 3}


def brute(q: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 full distance matrix: (nearest distance, first index of the minimum)."""
    d = np.sqrt(((q[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1))
    return d.min(1), d.argmin(1)


@pytest.mark.parametrize(
    "m,n,c,tiles",
    [
        (7, 5, 24, None),  # gallery smaller than one tile
        (300, 1000, 24, Tiles(64, 96)),  # sizes not multiples of the tile
        (50, 700, 200, Tiles(16, 128)),  # wide features (padded inner dimension)
        (33, 1, 3, Tiles(8, 8)),  # one gallery row
    ],
)
def test_indices_and_distances_match_brute_force(m, n, c, tiles):
    rng = np.random.default_rng(m + n + c)
    g = (rng.gamma(2.0, size=(n, c))).astype(np.float32)  # non-negative, as post-ReLU features
    q = (rng.gamma(2.0, size=(m, c))).astype(np.float32)
    d, idx = nearest_neighbors(torch.from_numpy(q), torch.from_numpy(g), tiles=tiles)
    want_d, want_i = brute(q, g)
    np.testing.assert_allclose(d.numpy(), want_d, rtol=1e-4)
    np.testing.assert_array_equal(idx.numpy(), want_i)


def test_exact_ties_across_tiles_pick_the_first_row():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(100, 6)).astype(np.float32)
    g[70] = g[5]  # an exact duplicate in another tile
    g[6] = g[5]  # and one in the same tile
    q = g[[5, 5, 40]] + 0.0
    d, idx = nearest_neighbors(torch.from_numpy(q), torch.from_numpy(g), tiles=Tiles(2, 32))
    assert idx.tolist() == [5, 5, 40]
    assert d.tolist() == [0.0, 0.0, 0.0]


def test_bf16_picks_a_near_optimal_neighbour_and_reports_its_exact_distance():
    rng = np.random.default_rng(1)
    g = rng.gamma(2.0, size=(5000, 24)).astype(np.float32)
    q = rng.gamma(2.0, size=(400, 24)).astype(np.float32)
    d, idx = nearest_neighbors(torch.from_numpy(q), torch.from_numpy(g), precision="bf16")
    want_d, _ = brute(q, g)
    exact_of_chosen = np.sqrt(((q.astype(np.float64) - g[idx.numpy()].astype(np.float64)) ** 2).sum(1))
    np.testing.assert_allclose(d.numpy(), exact_of_chosen, rtol=1e-5)  # the value is the chosen row's
    assert np.all(d.numpy() >= want_d * (1 - 1e-6))  # never below the true nearest
    assert np.median(d.numpy() / want_d - 1) < 1e-3  # and almost always the true nearest
    with pytest.raises(ValueError, match="precision"):
        nearest_neighbors(torch.from_numpy(q), torch.from_numpy(g), precision="fp8")


def _window_brute(t: np.ndarray, g: np.ndarray, r: int) -> np.ndarray:
    h, w, _ = t.shape
    out = np.full((h, w), np.inf)
    for y in range(h):
        for x in range(w):
            cand = g[:, max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].reshape(-1, t.shape[2])
            out[y, x] = np.sqrt(((cand.astype(np.float64) - t[y, x]) ** 2).sum(1)).min()
    return out


@pytest.mark.parametrize("h,w,r,block", [(9, 11, 0, 4), (9, 11, 1, 4), (12, 7, 2, 8), (6, 6, 3, 8)])
def test_window_search_matches_brute_force(h, w, r, block):
    rng = np.random.default_rng(h * w + r)
    t = rng.normal(size=(h, w, 5)).astype(np.float32)
    g = rng.normal(size=(4, h, w, 5)).astype(np.float32)
    d, idx = window_distances(torch.from_numpy(t), torch.from_numpy(g), r, block=block)
    np.testing.assert_allclose(d.numpy(), _window_brute(t, g, r), rtol=1e-5)
    # The index names a gallery feature inside the window at exactly that distance.
    k, rest = np.divmod(idx.numpy(), h * w)
    gy, gx = np.divmod(rest, w)
    yy, xx = np.mgrid[0:h, 0:w]
    assert np.all(np.abs(gy - yy) <= r) and np.all(np.abs(gx - xx) <= r)
    chosen = g[k, gy, gx]
    np.testing.assert_allclose(np.sqrt(((chosen.astype(np.float64) - t) ** 2).sum(-1)), d.numpy(), rtol=1e-5)


def test_window_as_large_as_the_map_is_the_full_search():
    rng = np.random.default_rng(5)
    t = rng.normal(size=(8, 8, 4)).astype(np.float32)
    g = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
    d, _ = window_distances(torch.from_numpy(t), torch.from_numpy(g), radius=8)
    full, _ = nearest_neighbors(torch.from_numpy(t.reshape(-1, 4)), torch.from_numpy(g.reshape(-1, 4)))
    np.testing.assert_allclose(d.numpy().ravel(), full.numpy(), rtol=1e-6)


def test_knn_images_ties_and_large_bank():
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(5000, 64)).astype(np.float32)
    bank[4000] = bank[10]  # exact tie: the lower index comes first
    q = bank[[10, 20]] + rng.normal(scale=1e-3, size=(2, 64)).astype(np.float32)
    d2, idx = knn_images(torch.from_numpy(q), torch.from_numpy(bank), k=50)
    full = ((q[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    want = np.argsort(full, axis=1, kind="stable")[:, :50]
    np.testing.assert_array_equal(idx.numpy(), want)
    np.testing.assert_allclose(d2.numpy(), np.take_along_axis(full, want, 1), rtol=1e-9)
    assert idx[0, :2].tolist() == [10, 4000]


# --------------------------------------------------------------------------------------------
# model level
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[SPADE, Path, Path]:
    from conftest import make_image
    from PIL import Image

    root = tmp_path_factory.mktemp("speed")
    rng = np.random.default_rng(0)
    for d in ("train", "test"):
        (root / d).mkdir()
    for i in range(8):
        Image.fromarray(make_image(rng)).save(root / "train" / f"n{i}.png")
    for i in range(2):
        Image.fromarray(make_image(rng)).save(root / "test" / f"good{i}.png")
        Image.fromarray(make_image(rng, defect=True)).save(root / "test" / f"bad{i}.png")
    model = SPADE(**SMALL).fit(root / "train")
    path = model.save(root / "model.safetensors")
    return model, path, root / "test"


def test_mmap_bank_predicts_bit_for_bit_the_same(fitted):
    _, path, test = fitted
    mem = SPADE.load(path)
    mapped = SPADE.load(path, mmap=True)
    assert isinstance(mapped.bank_.levels[0], MappedLevel)
    a, b = mem.predict(test), mapped.predict(test)
    np.testing.assert_array_equal(a.image_scores, b.image_scores)
    np.testing.assert_array_equal(a.anomaly_maps, b.anomaly_maps)
    # Unsorted and repeated indices come back in the order asked.
    idx = torch.tensor([5, 1, 1, 7, 0, 6])
    for lv_mem, lv_map in zip(mem.bank_.levels, mapped.bank_.levels, strict=True):
        assert torch.equal(lv_mem[idx], lv_map[idx])


def test_mmap_bank_refuses_a_file_replaced_after_loading(fitted, tmp_path):
    model, _, test = fitted
    copy = tmp_path / "m.safetensors"
    model.save(copy)
    mapped = SPADE.load(copy, mmap=True)
    SPADE(**{**SMALL, "k": 2}).fit(test).save(copy.with_name("other.safetensors"))
    os.replace(copy.with_name("other.safetensors"), copy)
    with pytest.raises(ModelFileError, match="changed on disk"):
        mapped.predict(test)


def test_mmap_load_still_verifies_the_checksum(fitted, tmp_path):
    _, path, _ = fitted
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the last tensor (a pixel-level feature)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        SPADE.load(bad, mmap=True)


def test_float16_bank_round_trip_and_close_scores(fitted, tmp_path):
    model, _, test = fitted
    half = SPADE(**SMALL, bank_dtype="float16").fit(test.parent / "train")
    assert all(lv.dtype == torch.float16 for lv in half.bank_.levels)
    loaded = SPADE.load(half.save(tmp_path / "h.safetensors"), mmap=True)
    assert loaded.bank_dtype == "float16" and loaded.bank_.levels[0].dtype == torch.float16
    full, approx = model.predict(test), loaded.predict(test)
    np.testing.assert_allclose(approx.image_scores, full.image_scores, rtol=1e-5)  # global features stay float32
    np.testing.assert_allclose(approx.anomaly_maps, full.anomaly_maps, rtol=1e-2, atol=1e-2 * full.anomaly_maps.max())


@pytest.mark.parametrize("opts", [{"precision": "bf16"}, {"window": 1}, {"window": 0, "levels": (2, 3)}])
def test_search_options_save_load_and_shapes(fitted, tmp_path, opts):
    _, _, test = fitted
    m = SPADE(**SMALL, **opts).fit(test.parent / "train")
    pred = m.predict(test)
    assert pred.anomaly_maps.shape == (4, 48, 48) and np.isfinite(pred.anomaly_maps).all()
    loaded = SPADE.load(m.save(tmp_path / "o.safetensors"))
    for key, value in opts.items():
        assert getattr(loaded, key) == value
    np.testing.assert_array_equal(loaded.predict(test).anomaly_maps, pred.anomaly_maps)
    e = loaded.explain(test)[0]  # explanations follow the same search
    assert e.distance.shape == e.source_x.shape


def test_window_changes_maps_and_bad_values_are_refused(fitted):
    _, _, test = fitted
    model = SPADE(**SMALL).fit(test.parent / "train")
    local = SPADE(**SMALL, window=0).fit(test.parent / "train")
    a, b = model.predict(test), local.predict(test)
    np.testing.assert_array_equal(a.image_scores, b.image_scores)
    assert np.all(b.anomaly_maps >= a.anomaly_maps - 1e-5)  # a smaller gallery is never closer
    assert not np.allclose(a.anomaly_maps, b.anomaly_maps)
    for bad in ({"window": -1}, {"window": 1, "kappa": 2}, {"precision": "fp16"}, {"bank_dtype": "int8"}):
        with pytest.raises(SpadeError):
            SPADE(**SMALL, **bad).fit(test.parent / "train")


def test_segment_above_runs_the_pixel_stage_only_for_flagged_images(fitted):
    model, _, test = fitted
    full = model.predict(test)
    cut = float(np.median(full.image_scores))
    part = model.predict(test, segment_above=cut)
    np.testing.assert_array_equal(part.image_scores, full.image_scores)
    assert part.segmented.tolist() == (full.image_scores > cut).tolist()
    assert 0 < part.segmented.sum() < len(full.image_scores)
    np.testing.assert_array_equal(part.anomaly_maps[part.segmented], full.anomaly_maps[part.segmented])
    assert np.isnan(part.anomaly_maps[~part.segmented]).all()
    with pytest.raises(SpadeError, match="image_score='knn'"):
        SPADE(**SMALL, image_score="map_max").fit(test.parent / "train").predict(test, segment_above=cut)


def test_cli_segment_above_writes_which_were_segmented(fitted, tmp_path):
    model, path, test = fitted
    scores = model.predict(test).image_scores
    cut = float(np.median(scores))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["predict", str(path), str(test), "--out", str(out), "--segment-above", str(cut)])
    assert r.exit_code == 0, r.output
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seg = {Path(row["path"]).stem: row["segmented"] == "1" for row in rows}
    got = {Path(row["path"]).stem: float(row["image_score"]) for row in rows}
    for stem, s in got.items():
        assert seg[stem] == (s > cut)
        assert (out / "maps" / f"{stem}.npy").exists() == seg[stem]
        assert (out / "overlays" / f"{stem}.png").exists() == seg[stem]
    assert "s per image" in r.output and "segmented" in r.output
