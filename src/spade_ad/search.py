"""Exact nearest-neighbour search: the image-level top-K and the per-pixel nearest gallery feature.

Both are exact searches (no approximation). The pixel search never builds the full (queries x
gallery) distance matrix: it walks queries and gallery in tiles, computes |g|^2 - 2 q.g with one GEMM
(``addmm``) per tile and keeps a running minimum; the winning distance is then recomputed in float64
inside the winning tile. Only between neighbours tied to within float32 rounding can the choice
differ from a float64 brute force, and then the distance differs by that rounding. That is the hot
loop of SPADE and it lives only here.
"""

from __future__ import annotations

import torch

#: Tile sizes of the pixel search: a 1024 x 1024 float32 block (4 MB) stays in cache and is large
#: enough for GEMM efficiency; measured ~2.5x faster than 3136 x 4096 blocks on a 2-core machine.
DEFAULT_TILE_Q = 1024
DEFAULT_TILE_G = 1024


def knn_images(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K nearest bank rows of each query: (squared Euclidean distances (M, k), indices (M, k)).

    Computed in float64 so that the image score (their mean) does not suffer from the cancellation
    of the |a|^2 + |b|^2 - 2ab expansion; the matrices are small (test x train images).
    """
    q = queries.to(torch.float64)
    b = bank.to(torch.float64)
    d2 = (q * q).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (q @ b.T)
    d2.clamp_(min=0.0)
    k = min(k, b.shape[0])
    vals, idx = torch.topk(d2, k, dim=1, largest=False, sorted=True)
    return vals, idx


def _tiled_smallest(
    q: torch.Tensor, g: torch.Tensor, kappa: int, tile_q: int, tile_g: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest values of |g|^2 - 2 q.g over the gallery, tile by tile.

    Returns ((M, kappa) values, (M,) start row of the gallery tile holding each query's best value).
    Queries and gallery are both tiled so that each (tile_q x tile_g) block stays in cache; only
    values are reduced (``amin`` is ~10x cheaper than ``min`` with indices on CPU), and the winning
    tile is remembered so the exact distance can be recomputed afterwards.
    """
    g_sq = (g * g).sum(1)
    out = torch.empty((q.shape[0], kappa), dtype=q.dtype)
    out_tile = torch.zeros(q.shape[0], dtype=torch.long)
    for i in range(0, q.shape[0], tile_q):
        qi = q[i : i + tile_q]
        best: torch.Tensor | None = None
        best_tile = torch.zeros(qi.shape[0], dtype=torch.long)
        for j in range(0, g.shape[0], tile_g):
            # |g|^2 - 2 q.g in one GEMM; |q|^2 is the same for every gallery row and is added later.
            part = torch.addmm(g_sq[j : j + tile_g].unsqueeze(0), qi, g[j : j + tile_g].T, beta=1.0, alpha=-2.0)
            if kappa == 1:
                m = part.amin(dim=1, keepdim=True)
                if best is None:
                    best = m
                else:
                    better = m[:, 0] < best[:, 0]
                    best_tile[better] = j
                    best = torch.minimum(best, m)
            else:
                m = torch.topk(part, min(kappa, part.shape[1]), dim=1, largest=False, sorted=False).values
                cat = m if best is None else torch.cat([best, m], dim=1)
                best = torch.topk(cat, min(kappa, cat.shape[1]), dim=1, largest=False, sorted=False).values
        assert best is not None
        out[i : i + tile_q] = best
        out_tile[i : i + tile_q] = best_tile
    return out, out_tile


def _refine_in_tile(
    q: torch.Tensor, g: torch.Tensor, tile_start: torch.Tensor, tile_g: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (float64) smallest squared distance of each query within its winning gallery tile,
    and the gallery row it belongs to."""
    out = torch.empty(q.shape[0], dtype=torch.float64)
    idx = torch.empty(q.shape[0], dtype=torch.long)
    for j in torch.unique(tile_start).tolist():
        rows = torch.nonzero(tile_start == j).squeeze(1)
        qj = q[rows].to(torch.float64)
        gj = g[j : j + tile_g].to(torch.float64)
        d2 = (qj * qj).sum(1, keepdim=True) + (gj * gj).sum(1)[None, :] - 2.0 * (qj @ gj.T)
        v, i = d2.min(dim=1)
        out[rows] = v
        idx[rows] = i + j
    return out.clamp_(min=0.0), idx


def nearest_neighbors(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    tile_q: int = DEFAULT_TILE_Q,
    tile_g: int = DEFAULT_TILE_G,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance of each query row to its nearest gallery row, and that row's index.

    Returns ((M,) float32 distances, (M,) int64 gallery indices). See :func:`nearest_distances`
    for how exactness is kept.
    """
    q, g = _centred(queries, gallery)
    _, tile_start = _tiled_smallest(q, g, 1, tile_q, tile_g)
    d2, idx = _refine_in_tile(q, g, tile_start, tile_g)
    return d2.sqrt_().to(torch.float32), idx


def _centred(queries: torch.Tensor, gallery: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets shifted by the gallery mean: distances unchanged, norms (and cancellation) smaller."""
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"shapes {tuple(queries.shape)} and {tuple(gallery.shape)} do not match")
    if gallery.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError("empty queries or gallery")
    mu = gallery.mean(dim=0, keepdim=True)
    return (queries - mu).contiguous(), (gallery - mu).contiguous()


def nearest_distances(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    kappa: int = 1,
    tile_q: int = DEFAULT_TILE_Q,
    tile_g: int = DEFAULT_TILE_G,
) -> torch.Tensor:
    """Mean Euclidean distance of each query row to its ``kappa`` nearest gallery rows.

    ``queries`` (M, C), ``gallery`` (G, C), float32. Returns (M,) float32 plain (not squared)
    distances, as the reference implementation that reproduced the paper's numbers.

    Precision: the float32 expansion |q|^2 + |g|^2 - 2 q.g loses digits by cancellation when a
    distance is small next to the norms (measured up to 4e-5 relative on real features). Both sets
    are centred on the gallery mean (distances unchanged, norms smaller), and for kappa = 1 the
    distance is recomputed in float64 inside the tile that won, so the value is exact for the
    chosen neighbour. For kappa > 1 the float32 values are kept (clamped at 0 before the root).
    """
    if kappa == 1:
        return nearest_neighbors(queries, gallery, tile_q, tile_g)[0]
    q, g = _centred(queries, gallery)
    kappa = min(kappa, gallery.shape[0])
    vals, _ = _tiled_smallest(q, g, kappa, tile_q, tile_g)
    d2 = (vals + (q * q).sum(1, keepdim=True)).clamp_(min=0.0)
    return d2.sqrt_().mean(dim=1)
