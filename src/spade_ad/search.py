"""Exact nearest-neighbour search: the image-level top-K and the per-pixel nearest gallery feature.

The pixel search is SPADE's hot loop and it lives only here. It never builds the full
(queries x gallery) distance matrix: queries and gallery are walked in tiles that stay in cache, each
tile's squared distances come out of **one** matrix product of augmented matrices

    [q, |q|^2, 1] @ [-2g, 1, |g|^2]^T = |q|^2 + |g|^2 - 2 q.g = |q - g|^2

(no separate pass to add the norms), and only each tile's row minima are kept. Because the products
are squared distances (non-negative but for rounding), the minimum is taken on the bits read as
integers, which orders non-negative IEEE floats exactly as their values and is cheaper than a
floating-point ``amin`` (much cheaper for bfloat16). Inside the tile that won, the same products
give the nearest row, and its distance is then computed directly in float64, so the reported value
is exact for the chosen neighbour. Only between neighbours tied to within float32 rounding
(bfloat16 rounding with ``precision="bf16"``) can the choice differ from a float64 brute force,
and then the distance differs by that rounding.

Options that change the answer are opt-in: ``precision="bf16"`` (bfloat16 products choose the
winning tile) and :func:`window_distances` (match only within +-R positions, as PatchMatch does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Tiles:
    """Tile shape of the pixel search: queries x gallery rows per matrix product."""

    q: int
    g: int


def tiles_for(dim: int, precision: str = "fp32") -> Tiles:
    """Tile sizes tuned per feature dimension (measured on a 2-core AVX-512 machine, see
    ``benchmarks/bench_pixel_search.py``).

    Narrow features (the embedded backbone's 24-112 channels) are bound by writing and reducing the
    product, so a 1024 x 512 float32 block (2 MB, in L2) is best; wide ones (WRN50's 256-1024) are
    bound by the product itself and prefer 1024 x 1024.
    """
    if dim >= 128 or precision == "bf16":
        return Tiles(1024, 1024)
    return Tiles(1024, 512)


def knn_images(
    queries: torch.Tensor, bank: torch.Tensor, k: int, bank_sq_norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """K nearest bank rows of each query: (squared Euclidean distances (M, k) float64, indices (M, k)).

    Candidates come from one float32 GEMM against the bank as it is (no copy of a possibly large
    bank is made; pass ``bank_sq_norms`` = |bank rows|^2 to skip recomputing them per call); the
    ``k + 16`` best candidates are then re-scored exactly (float64 differences) and re-sorted, ties
    to the lower index as a brute force would. So the distances are exact and the order is the
    float64 order unless float32 rounding moved a neighbour by more than 16 places.
    """
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"shapes {tuple(queries.shape)} and {tuple(bank.shape)} do not match")
    k = min(k, bank.shape[0])
    q = queries.to(torch.float32)
    b = bank.to(torch.float32)
    if bank_sq_norms is None:
        bank_sq_norms = torch.linalg.vector_norm(b, dim=1).square_()
    d2 = torch.addmm(bank_sq_norms[None, :], q, b.T, beta=1.0, alpha=-2.0)
    n_cand = min(k + 16, b.shape[0])
    cand = torch.topk(d2, n_cand, dim=1, largest=False, sorted=False).indices
    del d2
    diff = q.to(torch.float64)[:, None, :] - b[cand].to(torch.float64)  # (M, n_cand, D)
    exact = (diff * diff).sum(-1)
    # Sort by index first, then stably by distance: exact ties resolve to the lower bank index.
    cand_sorted, order = torch.sort(cand, dim=1)
    exact = torch.gather(exact, 1, order)
    vals, pos = torch.sort(exact, dim=1, stable=True)
    idx = torch.gather(cand_sorted, 1, pos)
    return vals[:, :k], idx[:, :k]


def _check(queries: torch.Tensor, gallery: torch.Tensor) -> None:
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"shapes {tuple(queries.shape)} and {tuple(gallery.shape)} do not match")
    if gallery.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError("empty queries or gallery")


def _width(c: int) -> int:
    # Wide features get their inner dimension padded with zeros to a multiple of 16, which keeps
    # the GEMM kernels on their fast path (the zeros change no value).
    return c + 2 if c < 128 else -(-(c + 2) // 16) * 16


def _augment(x: torch.Tensor, mu: torch.Tensor, gallery_side: bool, dtype: torch.dtype) -> torch.Tensor:
    """Rows whose products are squared distances, built in three passes over ``x``.

    Centring on the gallery mean ``mu`` leaves distances unchanged and makes the norms (and so the
    float32 cancellation of the expansion) smaller. Query side: ``[x - mu, |x - mu|^2, 1]``;
    gallery side: ``[-2 (x - mu), 1, |x - mu|^2]``; so ``q_aug @ g_aug.T = |q - g|^2``.
    """
    n, c = x.shape
    out = torch.empty((n, _width(c)), dtype=torch.float32)
    body = out[:, :c]
    scale = -2.0 if gallery_side else 1.0
    torch.add(-scale * mu, x, alpha=scale, out=body)  # scale * (x - mu), written in place
    sq = torch.linalg.vector_norm(body, dim=1).square_()
    if gallery_side:
        sq.mul_(0.25)
    out[:, c] = 1.0 if gallery_side else sq
    out[:, c + 1] = sq if gallery_side else 1.0
    out[:, c + 2 :] = 0.0
    return out if dtype == torch.float32 else out.to(dtype)


def _augmented_pair(
    queries: torch.Tensor, gallery: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked float32 (queries, gallery) and their augmented rows, centred on the gallery mean."""
    _check(queries, gallery)
    q, g = queries.to(torch.float32), gallery.to(torch.float32)
    mu = g.mean(dim=0)
    return q, g, _augment(q, mu, False, dtype), _augment(g, mu, True, dtype)


def _winning_tiles(qa: torch.Tensor, gaT: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """Start row of the gallery tile that holds each query's smallest product.

    ``qa`` (M, W) augmented queries, ``gaT`` (W, G) augmented gallery, transposed once so that every
    tile is a plain ``qa_i @ gaT[:, j:j+tg]`` product (the layout BLAS handles fastest for a short
    inner dimension). Each tile's row minima go into one (tiles, rows) matrix; the winning tile is
    its argmin at the end, so the loop does no bookkeeping per tile.
    """
    int_view = torch.int16 if qa.dtype == torch.bfloat16 else torch.int32
    n_q, n_g = qa.shape[0], gaT.shape[1]
    starts = list(range(0, n_g, tiles.g))
    out_tile = torch.empty(n_q, dtype=torch.long)
    buf = torch.empty((min(tiles.q, n_q), min(tiles.g, n_g)), dtype=qa.dtype)
    mins = torch.empty((len(starts), min(tiles.q, n_q)), dtype=int_view)
    for i in range(0, n_q, tiles.q):
        qi = qa[i : i + tiles.q]
        rows = qi.shape[0]
        for t, j in enumerate(starts):
            gj = gaT[:, j : j + tiles.g]
            part = buf[:rows, : gj.shape[1]]
            torch.mm(qi, gj, out=part)
            # Non-negative floats order as their bit patterns do; a rounding-negative value (a distance
            # of ~0) reads as a very negative integer and so also wins, which is the right answer.
            torch.amin(part.view(int_view), dim=1, out=mins[t, :rows])
        # First tile among equal minima, as a brute force keeps the first row among exact ties.
        out_tile[i : i + rows] = mins[:, :rows].argmin(dim=0) * tiles.g
    return out_tile


def _argmin_in_tile(qa: torch.Tensor, gaT: torch.Tensor, tile_start: torch.Tensor, tile_g: int) -> torch.Tensor:
    """Each query's nearest gallery row inside its winning tile: the argmin of the same products, one
    small GEMM per distinct winning tile (queries grouped by tile)."""
    idx = torch.empty(qa.shape[0], dtype=torch.long)
    int_view = torch.int16 if qa.dtype == torch.bfloat16 else torch.int32
    order = torch.argsort(tile_start, stable=True)
    starts, counts = torch.unique_consecutive(tile_start[order], return_counts=True)
    pos = 0
    for j, n in zip(starts.tolist(), counts.tolist(), strict=True):
        rows = order[pos : pos + n]
        pos += n
        part = torch.mm(qa[rows], gaT[:, j : j + tile_g])
        idx[rows] = part.view(int_view).argmin(dim=1) + j
    return idx


def nearest_neighbors(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    precision: str = "fp32",
    tiles: Tiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance of each query row to its nearest gallery row, and that row's index.

    ``queries`` (M, C), ``gallery`` (G, C) (float32, or float16 as stored in a half-precision bank).
    Returns ((M,) float32 plain (not squared) distances, as the reference implementation that
    reproduced the paper's numbers; (M,) int64 gallery indices). ``precision="bf16"`` finds the
    winning tile with bfloat16 products (opt-in; the distance is still recomputed exactly).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    q, g, qa, ga = _augmented_pair(queries, gallery, torch.bfloat16 if precision == "bf16" else torch.float32)
    tiles = tiles or tiles_for(q.shape[1], precision)
    # Short inner dimension: a contiguous transposed copy (plain NN products, fastest); wide features:
    # a transposed view (NT products, no copy of a large gallery; the GEMM dominates anyway).
    gaT = ga.T.contiguous() if q.shape[1] < 128 else ga.T
    idx = _argmin_in_tile(qa, gaT, _winning_tiles(qa, gaT, tiles), tiles.g)
    # The chosen row's distance, directly and in float64: no cancellation at all.
    diff = q.to(torch.float64) - g[idx].to(torch.float64)
    return (diff * diff).sum(1).sqrt_().to(torch.float32), idx


def nearest_distances(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    kappa: int = 1,
    precision: str = "fp32",
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """Mean Euclidean distance of each query row to its ``kappa`` nearest gallery rows, (M,) float32.

    kappa = 1 is :func:`nearest_neighbors` (exact value for the chosen neighbour). kappa > 1 keeps
    the ``kappa`` smallest float32 squared distances per tile and merges them (clamped at 0 before
    the root); it is the paper's option, not the default.
    """
    if kappa == 1:
        return nearest_neighbors(queries, gallery, precision, tiles)[0]
    q, g, qa, ga = _augmented_pair(queries, gallery, torch.float32)
    tiles = tiles or tiles_for(q.shape[1])
    kappa = min(kappa, g.shape[0])
    out = torch.empty((q.shape[0], kappa))
    for i in range(0, q.shape[0], tiles.q):
        best: torch.Tensor | None = None
        for j in range(0, g.shape[0], tiles.g):
            part = qa[i : i + tiles.q] @ ga[j : j + tiles.g].T
            m = torch.topk(part, min(kappa, part.shape[1]), dim=1, largest=False, sorted=False).values
            cat = m if best is None else torch.cat([best, m], dim=1)
            best = torch.topk(cat, min(kappa, cat.shape[1]), dim=1, largest=False, sorted=False).values
        assert best is not None
        out[i : i + tiles.q] = best
    return out.clamp_(min=0.0).sqrt_().mean(dim=1)


def _check_window(test: torch.Tensor, gallery: torch.Tensor, radius: int) -> None:
    if test.ndim != 3 or gallery.ndim != 4 or gallery.shape[1:] != test.shape:
        raise ValueError(f"gallery shape {tuple(gallery.shape)} does not match test features {tuple(test.shape)}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")


def window_distances(
    test: torch.Tensor, gallery: torch.Tensor, radius: int, block: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local search: each test pixel against the gallery features within +-``radius`` positions.

    ``test`` (h, w, C) one image's features at one level; ``gallery`` (K, h, w, C) the K nearest normal
    images' features at that level. Returns (h, w) float32 Euclidean distances to the nearest gallery
    feature at (y + dy, x + dx) for |dy|, |dx| <= radius (positions outside the map are skipped), and
    (h, w) int64 flat indices of those features, ``(k * h + y') * w + x'``.
    Work is K (2R+1)^2 per pixel instead of K h w, so it is far faster; it suits aligned objects
    (the paper's remark on using locality, as PatchMatch does) and is wrong for objects that move.

    The map is cut into ``block`` x ``block`` squares; each square's pixels are matched with one GEMM
    against the gallery features of the square grown by ``radius`` (positions outside a pixel's own
    window masked out), and the winner's distance is recomputed exactly in float64.
    """
    _check_window(test, gallery, radius)
    h, w, c = test.shape
    n_k = gallery.shape[0]
    g = gallery.to(torch.float32)
    mu = g.reshape(-1, c).mean(dim=0)
    g = g - mu
    t = test.to(torch.float32) - mu
    out = torch.empty((h, w), dtype=torch.float32)
    out_idx = torch.empty((h, w), dtype=torch.long)
    for y0 in range(0, h, block):
        for x0 in range(0, w, block):
            y1, x1 = min(y0 + block, h), min(x0 + block, w)
            gy0, gy1, gx0, gx1 = max(0, y0 - radius), min(h, y1 + radius), max(0, x0 - radius), min(w, x1 + radius)
            q = t[y0:y1, x0:x1].reshape(-1, c)
            cand = g[:, gy0:gy1, gx0:gx1].reshape(-1, c)
            d2 = torch.addmm((cand * cand).sum(1)[None, :], q, cand.T, beta=1.0, alpha=-2.0)
            # Window mask: query (qy, qx) may match candidate (cy, cx) only if both offsets are <= radius.
            qy, qx = torch.meshgrid(torch.arange(y0, y1), torch.arange(x0, x1), indexing="ij")
            cy, cx = torch.meshgrid(torch.arange(gy0, gy1), torch.arange(gx0, gx1), indexing="ij")
            ok = ((qy.reshape(-1, 1) - cy.reshape(1, -1)).abs() <= radius) & (
                (qx.reshape(-1, 1) - cx.reshape(1, -1)).abs() <= radius
            )
            d2 = d2.view(q.shape[0], n_k, -1).masked_fill_(~ok[:, None, :], float("inf")).view(q.shape[0], -1)
            best = d2.argmin(dim=1)
            diff = q.to(torch.float64) - cand[best].to(torch.float64)
            out[y0:y1, x0:x1] = (diff * diff).sum(1).sqrt().to(torch.float32).view(y1 - y0, x1 - x0)
            bh, bw = gy1 - gy0, gx1 - gx0
            kk, rest = best // (bh * bw), best % (bh * bw)
            flat = (kk * h + gy0 + rest // bw) * w + gx0 + rest % bw
            out_idx[y0:y1, x0:x1] = flat.view(y1 - y0, x1 - x0)
    return out, out_idx


def window_nearest(test: torch.Tensor, gallery: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The local-window kernel: same answer as :func:`window_distances`, at a cost of K (2R+1)^2 C per pixel.

    Instead of block products against a grown square (most of whose products the window mask then
    throws away), each of the (2R+1)^2 offsets (dy, dx) is one vectorised pass: every pixel against the
    gallery feature at (y + dy, x + dx) of all K images, as float32 differences (no expansion, so no
    cancellation). The winner is the first minimum in (image, y', x') order, which is the order the
    block search breaks ties in, and its distance is recomputed in float64. Returns (h, w) float32
    distances and (h, w) int64 flat indices ``(k * h + y') * w + x'``, as :func:`window_distances`.
    """
    _check_window(test, gallery, radius)
    h, w, _ = test.shape
    n_k = gallery.shape[0]
    t = test.to(torch.float32)
    g = gallery.to(torch.float32)
    # Offsets beyond the map reach no position; clamping keeps a huge radius from allocating for nothing.
    ry, rx = min(radius, h - 1), min(radius, w - 1)
    offsets = [(dy, dx) for dy in range(-ry, ry + 1) for dx in range(-rx, rx + 1)]
    d2 = torch.full((n_k, len(offsets), h, w), float("inf"), dtype=torch.float32, device=t.device)
    for o, (dy, dx) in enumerate(offsets):
        y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
        diff = g[:, y0 + dy : y1 + dy, x0 + dx : x1 + dx] - t[y0:y1, x0:x1]
        torch.linalg.vector_norm(diff, dim=-1, out=d2[:, o, y0:y1, x0:x1])
    # argmin returns the first minimum: image k first, then offset (dy, then dx), i.e. (k, y', x') order.
    best = d2.view(n_k * len(offsets), h, w).argmin(dim=0)
    kk, which = best // len(offsets), best % len(offsets)
    off = torch.tensor(offsets, dtype=torch.long, device=t.device)
    yy = torch.arange(h, device=t.device)[:, None] + off[which, 0]
    xx = torch.arange(w, device=t.device)[None, :] + off[which, 1]
    diff64 = g[kk, yy, xx].to(torch.float64) - t.to(torch.float64)
    dist = (diff64 * diff64).sum(-1).sqrt_().to(torch.float32)
    return dist, (kk * h + yy) * w + xx


def window_search(test: torch.Tensor, gallery: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The window search the model runs: :func:`window_nearest` for R <= 1, :func:`window_distances` above.

    Both give the same indices and distances. On 2 cores the per-offset kernel is 1.8-2.7x faster at
    R = 1 (9 offsets), about even at R = 2 and slower from R = 3: its elementwise passes are memory-bound,
    while the block GEMMs do more arithmetic at BLAS speed (``benchmarks/bench_throughput.py``).
    """
    return (window_nearest if radius <= 1 else window_distances)(test, gallery, radius)


def nearest_neighbors_dense(
    queries: torch.Tensor, gallery: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest_neighbors` for any device (a GPU): chunks of queries against the whole gallery.

    Each chunk's squared distances come from one float32 product of centred features (a GPU has the
    memory for chunk x G at once); the winner's distance is recomputed in float64 as on the CPU. The
    choice can differ from the CPU search only between neighbours tied to within float32 rounding.
    """
    _check(queries, gallery)
    q, g = queries.to(torch.float32), gallery.to(torch.float32)
    mu = g.mean(dim=0)
    qc, gc = q - mu, g - mu
    g_sq = (gc * gc).sum(1)
    idx = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
    for i in range(0, q.shape[0], chunk):
        # |q|^2 is the same for every gallery row of a query: the argmin does not need it.
        idx[i : i + chunk] = torch.addmm(g_sq[None, :], qc[i : i + chunk], gc.T, alpha=-2.0).argmin(dim=1)
    diff = q.to(torch.float64) - g[idx].to(torch.float64)
    return (diff * diff).sum(1).sqrt_().to(torch.float32), idx


def device_search(test: torch.Tensor, gallery: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One level's pixel search on ``gallery``'s device; (h, w) distances and flat indices, on the CPU.

    ``test`` (h, w, C) (moved to the gallery's device), ``gallery`` (K, h, w, C). ``window``: None for the
    full search (:func:`nearest_neighbors_dense`), else the radius (:func:`window_nearest`).
    """
    h, w, c = test.shape
    t = test.to(gallery.device)
    if window is not None:
        d, idx = window_nearest(t, gallery, window)
    else:
        d, idx = nearest_neighbors_dense(t.reshape(-1, c), gallery.reshape(-1, c))
    return d.reshape(h, w).cpu(), idx.reshape(h, w).cpu()
