"""Mask selection on score matrices: exact counts (unstructured), per row, and N:M groups (see `patterns`)."""

from __future__ import annotations

from typing import Optional

import torch

from .patterns import group_zero_counts


def kth_smallest(flat: torch.Tensor, k: int, near: Optional[torch.Tensor] = None,
                 bands: tuple[float, ...] = (0.05, 0.25)) -> torch.Tensor:
    """The `k`-th smallest entry of the 1-D `flat` (1-based). With `near` (a guess, e.g. the previous step's value
    of an iterative method) the entries within ±band of it are selected from when they hold the answer (the
    narrowest of `bands` that does): comparisons and a small `kthvalue` instead of a full one (several times faster
    on a 1M-entry matrix); the same value."""
    if near is not None and float(near) > 0:
        for band in bands:
            low, high = near * (1 - band), near * (1 + band)
            below = int((flat < low).sum())
            if below < k:
                inside = (flat >= low) & (flat < high)
                if below + int(inside.sum()) >= k:
                    return torch.kthvalue(flat[inside], k - below).values
    return torch.kthvalue(flat, k).values


def lowest_k_mask(scores: torch.Tensor, k: int, threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask (True = prune) of the `k` lowest entries of `scores`; ties at the threshold are broken by
    position (first come first pruned), so the result is deterministic and holds exactly `k` entries.
    `threshold`, when known, is the `k`-th smallest score (`kth_smallest`)."""
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    if threshold is None:
        threshold = kth_smallest(flat, k)
    mask = flat < threshold
    missing = k - int(mask.sum())
    if missing > 0:  # fill up with the first entries equal to the threshold
        ties = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[ties] = True
    return mask.view_as(scores)


def rowwise_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring entries of each row; exact total per the rounding rule."""
    rows, cols = scores.shape
    counts = group_zero_counts(sparsity, [cols] * rows)
    if len(set(counts)) == 1:  # every row the same count: one vectorised sort
        k = counts[0]
        mask = torch.zeros_like(scores, dtype=torch.bool)
        if k:
            idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
            mask.scatter_(1, idx, True)
        return mask
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=scores.device).expand(rows, cols))
    limit = torch.tensor(counts, device=scores.device).unsqueeze(1)
    return ranks < limit


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the `n` lowest-scoring of every `m` consecutive entries along each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M needs the column count ({cols}) to be a multiple of M={m}.")
    grouped = scores.reshape(rows, cols // m, m)
    idx = torch.sort(grouped, dim=-1, stable=True).indices[..., :n]
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def nm_pattern_ok(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive inputs of every row holds at least `n` zeros."""
    rows, cols = weight.shape
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(-1)
    return bool((zeros >= n).all())
