"""Exact-enough, deterministic 1-D k-means, as SplitQuant needs (k = 3 over a whole weight tensor).

The values are sorted once; every Lloyd iteration then costs O(k log N) through prefix sums,
because in one dimension each cluster is a contiguous run of the sorted values. Initialisation is
k-means++ (seeded), as in scikit-learn's default that the SplitQuant authors used; iteration stops
when the assignment no longer changes (or after ``max_iter``).
"""

from __future__ import annotations

import torch

__all__ = ["kmeans_1d", "split_boundaries", "assign_clusters"]


def _kmeanspp_init(values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    n = values.numel()
    first = torch.randint(n, (1,), generator=generator).item()
    centers = [values[first]]
    for _ in range(1, k):
        c = torch.stack(centers)
        d2 = (values.unsqueeze(1) - c.unsqueeze(0)).pow(2).amin(dim=1)
        total = d2.sum()
        if total <= 0:  # fewer distinct values than clusters
            centers.append(values[torch.randint(n, (1,), generator=generator).item()])
            continue
        idx = torch.multinomial((d2 / total).float(), 1, generator=generator).item()
        centers.append(values[idx])
    return torch.stack(centers).sort().values


def kmeans_1d(values: torch.Tensor, k: int = 3, seed: int = 0, max_iter: int = 300) -> torch.Tensor:
    """Cluster centres (float64, sorted ascending) of the 1-D data ``values`` (any shape, flattened).

    Deterministic for a given ``seed``. Empty clusters keep their previous centre.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    v = values.detach().reshape(-1).to(torch.float64).cpu()
    if v.numel() == 0:
        raise ValueError("cannot cluster an empty tensor")
    if not torch.isfinite(v).all():
        raise ValueError("cannot cluster values that contain NaN or Inf")
    v = v.sort().values
    zero = torch.zeros(1, dtype=torch.float64)
    prefix = torch.cat([zero, v.cumsum(0)])
    generator = torch.Generator().manual_seed(seed)
    centers = _kmeanspp_init(v, k, generator)
    cuts = None
    for _ in range(max_iter):
        mids = (centers[1:] + centers[:-1]) / 2
        # Each value goes to the nearest centre: cluster j holds values in (mids[j-1], mids[j]].
        new_cuts = torch.cat(
            [torch.zeros(1, dtype=torch.long), torch.searchsorted(v, mids, right=True), torch.tensor([v.numel()])]
        )
        if cuts is not None and torch.equal(new_cuts, cuts):
            break
        cuts = new_cuts
        counts = (cuts[1:] - cuts[:-1]).to(torch.float64)
        sums = prefix[cuts[1:]] - prefix[cuts[:-1]]
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers).sort().values
    return centers


def split_boundaries(centers: torch.Tensor) -> tuple[float, float]:
    """SplitQuant's two boundaries: the midpoints between consecutive sorted centres (k = 3)."""
    if centers.numel() != 3:
        raise ValueError(f"SplitQuant uses exactly 3 clusters, got {centers.numel()} centres")
    c = centers.sort().values
    return float((c[0] + c[1]) / 2), float((c[1] + c[2]) / 2)


def assign_clusters(weight: torch.Tensor, boundaries: tuple[float, float]) -> torch.Tensor:
    """Cluster id per weight, as in the authors' code: 0 if ``w <= b0``, 2 if ``w >= b1``, else 1."""
    b0, b1 = boundaries
    w = weight.to(torch.float64)
    ids = torch.ones_like(w, dtype=torch.uint8)
    ids[w <= b0] = 0
    ids[w >= b1] = 2
    return ids
