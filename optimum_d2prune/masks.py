"""Sparsity patterns and mask selection (unstructured with exact counts, N:M).

Rounding rule (unstructured): a matrix with `numel` entries gets exactly `round_half_up(sparsity * numel)` zeros.
When the selection runs group by group (SparseGPT's column blocks, Wanda's rows), group g receives
`round_half_up(s * end_g) - round_half_up(s * start_g)` zeros, where start/end are the cumulative entry counts of
the groups before and including g. The per-group counts therefore differ by at most one from `s * size_g` and add
up to exactly the matrix total.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (the rounding rule of every zero count in this library)."""
    return int(math.floor(x + 0.5 + 1e-9))


@dataclass(frozen=True)
class SparsityPattern:
    """Either an unstructured fraction of zeros or an N:M pattern (N zeros in every M consecutive inputs)."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def structure(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def __str__(self) -> str:
        return self.structure if self.is_nm else f"{self.sparsity:.0%}"

    @classmethod
    def parse(cls, mask_structure: str, sparsity: float) -> "SparsityPattern":
        """Validate `mask_structure`/`sparsity` and return the pattern (raises `ValueError` with the allowed range)."""
        if not isinstance(mask_structure, str):
            raise ValueError(f'`mask_structure` must be "unstructured" or "N:M" such as "2:4", got {mask_structure!r}.')
        if mask_structure.strip().lower() == "unstructured":
            if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
                raise ValueError(f"`sparsity` must be a number in [0, 1), got {sparsity!r}.")
            return cls(sparsity=float(sparsity))
        match = _NM_RE.match(mask_structure)
        if match is None:
            raise ValueError(f'`mask_structure` must be "unstructured" or "N:M" such as "2:4", got {mask_structure!r}.')
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M (N zeros in every M weights), got {mask_structure!r}.")
        return cls(sparsity=n / m, n=n, m=m)

    def num_zeros(self, numel: int) -> int:
        """Zeros a matrix of `numel` entries ends with."""
        return round_half_up(self.sparsity * numel)

    def check_shape(self, name: str, columns: int) -> None:
        """Raise a clear error when an N:M pattern cannot tile a matrix with `columns` inputs."""
        if self.is_nm and columns % self.m:
            raise ValueError(
                f"`{name}` has {columns} input features, not a multiple of M={self.m} for {self.structure}; "
                "add it to `ignore` or choose another pattern."
            )


def group_zero_counts(sparsity: float, group_sizes: list[int]) -> list[int]:
    """Exact per-group zero counts by cumulative rounding (see the module docstring)."""
    counts, done, start = [], 0, 0
    for size in group_sizes:
        end = start + size
        target = round_half_up(sparsity * end)
        counts.append(target - done)
        done, start = target, end
    return counts


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
