"""Calibration sums of a consuming layer (down_proj / fc2 / o_proj): `X Xᵀ`, `Σx` and `Σy²` (fp32 by default).

Sums only, normalised when read, so the result does not depend on how the tokens were batched. With N tokens:
`H = (2/N) X Xᵀ` (the layer-wise Hessian of the unstructured method), `mean_j = Σx_j / N`, the per-token RMS of
inputs and outputs for the dual-Taylor terms. `augmented_gram` appends a constant input of 1, whose weight is the
layer's bias: a least-squares refit over it fits the bias too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class ConsumerStatistics:
    """Sums over calibration tokens of one consuming layer's inputs `x [cols]` and dense outputs `y [rows]`."""

    columns: int
    device: torch.device
    seq_len: int = 1
    dtype: torch.dtype = torch.float32
    tokens: int = 0
    gram: torch.Tensor = field(init=False)
    total: torch.Tensor = field(init=False)
    y_sq: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self.gram = torch.zeros(self.columns, self.columns, dtype=self.dtype, device=self.device)
        self.total = torch.zeros(self.columns, dtype=self.dtype, device=self.device)

    def add(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
        """Accumulate `[tokens, cols]` inputs (and `[tokens, rows]` outputs)."""
        x = x.to(device=self.device, dtype=self.dtype)
        self.tokens += x.shape[0]
        self.gram.addmm_(x.t(), x)
        self.total.add_(x.sum(0))
        if y is not None:
            y = y.to(device=self.device, dtype=self.dtype).square().sum(0)
            self.y_sq = y if self.y_sq is None else self.y_sq.add_(y)

    def mean(self) -> torch.Tensor:
        return self.total / max(self.tokens, 1)

    def x_sq_mean(self) -> torch.Tensor:
        return torch.diagonal(self.gram) / max(self.tokens, 1)

    def variance(self) -> torch.Tensor:
        """Sample variance of each input over the tokens (FLAP's fluctuation)."""
        n = max(self.tokens, 2)
        return (torch.diagonal(self.gram) - self.total.square() / n).clamp_min(0) / (n - 1)

    def hessian(self) -> torch.Tensor:
        """`H = (2/N) X Xᵀ` (a new tensor)."""
        return self.gram * (2.0 / max(self.tokens, 1))

    def x_norm(self) -> torch.Tensor:
        """Per-input norm in the dual-Taylor sense: `sqrt(L) · x_rms`."""
        return (self.x_sq_mean() * self.seq_len).sqrt()

    def y_norm(self) -> torch.Tensor:
        if self.y_sq is None:
            raise RuntimeError("No output sums were collected for this layer.")
        return (self.y_sq / max(self.tokens, 1) * self.seq_len).sqrt()

    def augmented_gram(self) -> torch.Tensor:
        """`[[Σ x xᵀ, Σ x], [Σ xᵀ, N]]`: the sums with a constant input of 1 appended (the bias's input)."""
        n = self.columns
        out = torch.empty(n + 1, n + 1, dtype=self.gram.dtype, device=self.gram.device)
        out[:n, :n] = self.gram
        out[:n, n] = out[n, :n] = self.total
        out[n, n] = float(self.tokens)
        return out
