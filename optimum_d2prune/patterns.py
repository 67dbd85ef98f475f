"""Sparsity patterns: an unstructured fraction of zeros or N:M, and the rounding rule of every zero count.

Rounding rule (unstructured): a matrix with `numel` entries gets exactly `round_half_up(sparsity * numel)` zeros.
When the selection runs group by group (SparseGPT's column blocks, Wanda's rows), group g receives
`round_half_up(s * end_g) - round_half_up(s * start_g)` zeros, where start/end are the cumulative entry counts of
the groups before and including g. The per-group counts therefore differ by at most one from `s * size_g` and add
up to exactly the matrix total.

No torch here: the configuration and the command line parse patterns before torch is imported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import ConfigError
from .validation import as_float

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
            raise ConfigError(f'`mask_structure` must be "unstructured" or "N:M" such as "2:4", got {mask_structure!r}.')
        if mask_structure.strip().lower() == "unstructured":
            return cls(sparsity=as_float("sparsity", sparsity, 0.0, 1.0))
        match = _NM_RE.match(mask_structure)
        if match is None:
            raise ConfigError(f'`mask_structure` must be "unstructured" or "N:M" such as "2:4", got {mask_structure!r}.')
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ConfigError(f"N:M needs 0 < N < M (N zeros in every M weights), got {mask_structure!r}.")
        return cls(sparsity=n / m, n=n, m=m)

    def num_zeros(self, numel: int) -> int:
        """Zeros a matrix of `numel` entries ends with."""
        return round_half_up(self.sparsity * numel)

    def check_shape(self, name: str, columns: int) -> None:
        """Raise a clear error when an N:M pattern cannot tile a matrix with `columns` inputs."""
        if self.is_nm and columns % self.m:
            raise ConfigError(
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
