"""The exact search against brute force: ties, tiny galleries, sizes that are not a tile multiple."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_ad.search import Tiles, knn_images, nearest_distances


def brute_min(q: np.ndarray, g: np.ndarray, kappa: int = 1) -> np.ndarray:
    """Double loop in float64: for each query, the mean of its kappa smallest Euclidean distances."""
    out = np.empty(len(q))
    for i in range(len(q)):
        d = [np.sqrt(np.sum((q[i].astype(np.float64) - g[j].astype(np.float64)) ** 2)) for j in range(len(g))]
        out[i] = np.mean(sorted(d)[:kappa])
    return out


@pytest.mark.parametrize(
    "m,n,c,tile_q,tile_g",
    [
        (5, 3, 4, 1024, 1024),  # gallery smaller than one tile
        (37, 101, 8, 16, 32),  # neither size a multiple of the tiles
        (64, 64, 3, 64, 64),  # exactly one tile
        (10, 1, 6, 4, 4),  # a single gallery row
    ],
)
def test_nearest_matches_brute_force(m, n, c, tile_q, tile_g):
    rng = np.random.default_rng(m * 1000 + n)
    q = rng.normal(size=(m, c)).astype(np.float32) * 3 + 5  # offset: large norms, as real ReLU features
    g = rng.normal(size=(n, c)).astype(np.float32) * 3 + 5
    got = nearest_distances(torch.from_numpy(q), torch.from_numpy(g), kappa=1, tiles=Tiles(tile_q, tile_g))
    want = brute_min(q, g)
    assert got.dtype == torch.float32 and got.shape == (m,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_kappa_mean_of_nearest():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(20, 5)).astype(np.float32)
    g = rng.normal(size=(77, 5)).astype(np.float32)
    got = nearest_distances(torch.from_numpy(q), torch.from_numpy(g), kappa=3, tiles=Tiles(8, 10))
    np.testing.assert_allclose(got.numpy(), brute_min(q, g, kappa=3), rtol=1e-4)


def test_exact_zero_and_ties():
    # Queries that are copies of gallery rows have distance exactly 0 (no negative-sqrt NaN), and a
    # query equidistant from two rows gets that common distance.
    g = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    q = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0]])
    got = nearest_distances(q, g, tiles=Tiles(2, 2))
    assert got.tolist() == [0.0, 1.0, 0.0]


def test_near_duplicates_keep_relative_precision():
    # Tiny distances next to large norms: the float32 expansion alone would lose ~1e-4 relative here.
    rng = np.random.default_rng(7)
    g = (rng.uniform(size=(3000, 24)) * 6).astype(np.float32)
    q = g[:50] + rng.normal(scale=1e-2, size=(50, 24)).astype(np.float32)
    got = nearest_distances(torch.from_numpy(q), torch.from_numpy(g), tiles=Tiles(16, 512))
    np.testing.assert_allclose(got.numpy(), brute_min(q, g), rtol=1e-5)


def test_knn_images_matches_brute_force():
    rng = np.random.default_rng(11)
    bank = rng.normal(size=(30, 7))
    queries = rng.normal(size=(4, 7))
    d2, idx = knn_images(torch.from_numpy(queries).float(), torch.from_numpy(bank).float(), k=5)
    full = ((queries[:, None, :] - bank[None].astype(np.float32).astype(np.float64)) ** 2).sum(-1)
    want_idx = np.argsort(full, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(idx.numpy(), want_idx)
    np.testing.assert_allclose(d2.numpy(), np.take_along_axis(full, want_idx, 1), rtol=1e-5)


def test_knn_k_larger_than_bank_uses_all():
    d2, idx = knn_images(torch.zeros(2, 3), torch.eye(3), k=10)
    assert idx.shape == (2, 3)
    np.testing.assert_allclose(d2.numpy(), np.ones((2, 3)))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        nearest_distances(torch.zeros(3, 4), torch.zeros(5, 3))
