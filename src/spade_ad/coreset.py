"""Greedy k-center (farthest-point) coreset of the pixel memory, as in PatchCore (Roth et al., 2022).

Greedy k-center starts from one seeded random row and repeatedly adds the row farthest from
everything chosen so far. Done naively, every selection re-reads the whole memory (N rows) to
update each row's distance to the chosen set: that is the per-point loop that makes PatchCore's
10 % coreset of a few hundred images take half an hour on a CPU.

Here the selections are made in **rounds**, and the result is the naive greedy sequence itself,
not an approximation of it. At the start of a round every row ``x`` knows ``m(x)``, its distance to
the chosen set. Take the ``B`` rows with the largest ``m`` (the candidates) and ``T``, the largest
``m`` among the others. A row's ``m`` never grows, so no other row can be the farthest while some
candidate's up-to-date value is still above ``T``; and the candidates' values after each pick need
only their distances to each other (one ``B x B`` matrix product). So greedy runs on the candidates
alone until their best value falls to ``T``, and only then are all N rows updated, with one batched
matrix product against all the round's picks. The per-pick work is a few operations on ``B``
numbers; the memory is read once per round.

Distances are computed on a seeded Gaussian random projection of the features to
:data:`PROJECTION_DIM` dimensions (Johnson-Lindenstrauss; PatchCore does the same) when they are
wider than that. Products are float32, so between rows whose distances tie to within float32
rounding the choice may differ from a float64 brute force.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Features wider than this are randomly projected to it before the distance computations.
PROJECTION_DIM = 128
#: Candidates per round.
_CANDIDATES = 2048
#: Rows per block of the round update (bounds the (rows x picks) product held at once).
_UPDATE_ROWS = 32768


def coreset_size(n: int, fraction: float) -> int:
    """Rows kept from ``n`` for a coreset ``fraction`` in (0, 1]: ceil(fraction * n), at least 1."""
    return max(1, min(n, math.ceil(fraction * n)))


def project(x: torch.Tensor, seed: int, dim: int = PROJECTION_DIM) -> torch.Tensor:
    """``x`` (N, C) as float32, projected to ``dim`` columns by a seeded Gaussian matrix if C > dim."""
    x = x.to(torch.float32)
    if x.shape[1] <= dim:
        return x
    gen = torch.Generator().manual_seed(seed)
    # Scaled so that squared distances are preserved in expectation.
    proj = torch.randn((x.shape[1], dim), generator=gen) / math.sqrt(dim)
    return x @ proj


def greedy_kcenter(x: torch.Tensor, n_select: int, seed: int = 0, candidates: int = _CANDIDATES) -> torch.Tensor:
    """Indices (n_select,) int64 of the greedy k-center selection of the rows of ``x`` (N, D), in
    selection order. The first row is drawn with ``seed``; each next one is the row farthest (Euclidean)
    from those chosen, the lowest index among exact ties. ``x`` is used as given (project it first)."""
    n = x.shape[0]
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select must be in 1..{n}, got {n_select}")
    x = x.to(torch.float32).contiguous()
    sq = torch.linalg.vector_norm(x, dim=1).square_()
    first = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = [first]
    mind = torch.full((n,), float("inf"))  # squared distance of every row to the chosen set
    _update(x, sq, mind, [first])
    while len(chosen) < n_select:
        b = min(candidates, n)
        top = torch.topk(mind, min(b + 1, n), sorted=True)
        cand = top.indices[:b]
        threshold = float(top.values[b]) if b < n else -math.inf
        vals_desc = top.values[:b]
        # Re-sort ties by index so that argmax (first maximum) picks the lowest index, as the naive loop.
        cand, perm = torch.sort(cand)
        vals = vals_desc[perm].numpy().astype(np.float64)
        xc = x[cand]
        pair = (sq[cand][:, None] + sq[cand][None, :] - 2.0 * (xc @ xc.T)).clamp_(min=0).numpy()
        picked: list[int] = []
        while len(chosen) + len(picked) < n_select:
            j = int(np.argmax(vals))
            # Another row (value <= threshold) might be as far: end the round, update everything.
            if not vals[j] > threshold:
                break
            picked.append(j)
            np.minimum(vals, pair[j], out=vals)
            vals[j] = -np.inf
        # Every candidate ties with the threshold: one plain greedy step (argmax = first maximum).
        rows = cand[picked].tolist() if picked else [int(torch.argmax(mind))]
        chosen.extend(rows)
        _update(x, sq, mind, rows)
    return torch.tensor(chosen[:n_select], dtype=torch.long)


def _update(x: torch.Tensor, sq: torch.Tensor, mind: torch.Tensor, rows: list[int]) -> None:
    """mind = min(mind, squared distance of every row of x to the rows ``rows``), in blocks."""
    p = x[rows]
    p_sq = sq[rows]
    for start in range(0, x.shape[0], _UPDATE_ROWS):
        blk = slice(start, start + _UPDATE_ROWS)
        d2 = torch.addmm(p_sq[None, :], x[blk], p.T, beta=1.0, alpha=-2.0).add_(sq[blk, None])
        torch.minimum(mind[blk], d2.amin(dim=1).clamp_(min=0), out=mind[blk])
    mind[rows] = 0.0
