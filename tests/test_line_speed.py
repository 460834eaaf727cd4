"""Line speed (issue 13): the local-window kernel, backbone runtimes and export, device plumbing, the
thread policy and the ``fast`` preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_ad.search import window_distances, window_nearest, window_search


def _window_brute(t: np.ndarray, g: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 double loop: nearest distance in the window and the first flat index (k, y', x') at it."""
    h, w, _ = t.shape
    dist, idx = np.full((h, w), np.inf), np.zeros((h, w), np.int64)
    for y in range(h):
        for x in range(w):
            for k in range(g.shape[0]):
                for yy in range(max(0, y - r), min(h, y + r + 1)):
                    for xx in range(max(0, x - r), min(w, x + r + 1)):
                        d = np.sqrt(((g[k, yy, xx].astype(np.float64) - t[y, x]) ** 2).sum())
                        if d < dist[y, x]:
                            dist[y, x], idx[y, x] = d, (k * h + yy) * w + xx
    return dist, idx


@pytest.mark.parametrize("h,w,c,k,r", [(9, 11, 5, 4, 0), (9, 11, 5, 4, 1), (12, 7, 3, 3, 2), (6, 6, 4, 2, 9)])
def test_window_kernel_matches_brute_force(h, w, c, k, r):
    rng = np.random.default_rng(h * w + r)
    t = rng.gamma(2.0, size=(h, w, c)).astype(np.float32)
    g = rng.gamma(2.0, size=(k, h, w, c)).astype(np.float32)
    d, idx = window_nearest(torch.from_numpy(t), torch.from_numpy(g), r)
    want_d, want_i = _window_brute(t, g, r)
    np.testing.assert_array_equal(idx.numpy(), want_i)
    np.testing.assert_allclose(d.numpy(), want_d, rtol=1e-6)
    assert d.dtype == torch.float32 and idx.dtype == torch.int64


@pytest.mark.parametrize("h,c,r", [(28, 40, 1), (14, 112, 2), (20, 24, 3)])
def test_window_kernel_equals_the_block_search(h, c, r):
    # Feature-like data (non-negative, shared offset) at the embedded backbone's level shapes.
    rng = np.random.default_rng(c + r)
    base = rng.gamma(2.0, size=(h, h, c)).astype(np.float32)
    g = torch.from_numpy(base + rng.normal(scale=0.5, size=(10, h, h, c)).astype(np.float32))
    t = torch.from_numpy(base + rng.normal(scale=0.5, size=(h, h, c)).astype(np.float32))
    d_old, i_old = window_distances(t, g, r)
    d_new, i_new = window_nearest(t, g, r)
    torch.testing.assert_close(i_new, i_old, rtol=0, atol=0)
    torch.testing.assert_close(d_new, d_old, rtol=1e-6, atol=0)
    _, i_used = window_search(t, g, r)
    assert torch.equal(i_used, i_old)


def test_window_kernel_ties_go_to_the_first_image_and_position():
    g = torch.zeros(3, 4, 4, 2)  # every candidate is an exact tie at distance 0
    d, idx = window_nearest(torch.zeros(4, 4, 2), g, 1)
    assert d.abs().max() == 0
    yy, xx = np.mgrid[0:4, 0:4]
    # First in (image, y', x') order: image 0, the window's top-left position.
    np.testing.assert_array_equal(idx.numpy(), np.maximum(yy - 1, 0) * 4 + np.maximum(xx - 1, 0))
    with pytest.raises(ValueError, match="radius"):
        window_nearest(torch.zeros(4, 4, 2), g, -1)
    with pytest.raises(ValueError, match="does not match"):
        window_nearest(torch.zeros(4, 5, 2), g, 1)
