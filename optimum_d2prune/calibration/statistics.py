"""Calibration statistics of one linear layer, accumulated in fp32 independently of batch order and count.

Definitions (N = calibration tokens, L = tokens per calibration sequence):
- `H = (2/N) X Xᵀ`, the layer-wise OBS Hessian (only when a solver asks for it; otherwise just its diagonal);
- `x_rms[j] = sqrt(sum_t x_tj² / N)` and `y_rms[i] = sqrt(sum_t y_ti² / N)` (dense outputs, bias included);
- the dual-Taylor "norms" are per-sequence L2 norms in the RMS sense: `‖x_j‖ = sqrt(L) * x_rms[j]`; the scale
  `activation_scale` divides them (its "auto" value makes the λ1 term independent of L; configuration.py).
Sums are normalised only when read, so the result does not depend on how tokens were batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

STATS_LEVELS = ("none", "diag", "hessian")
#: column block of the X Xᵀ update: only blocks on and above the diagonal are multiplied (about 60 % of the flops
#: of the full product for the MLP down projection), the lower triangle is mirrored when the sum is read
GRAM_BLOCK = 384


@dataclass
class InputStatistics:
    """Sums over calibration tokens of one input stream (shared by the linears that read the same tensor)."""

    columns: int
    level: str
    device: torch.device
    num_tokens: int = 0
    xtx: Optional[torch.Tensor] = None  # sum x xᵀ, or the damped H once factorised (read through the methods)
    x_sq: Optional[torch.Tensor] = None  # sum x² (diag level)
    _hinv_cache: dict = field(default_factory=dict, repr=False)
    _lower_stale: bool = field(default=False, repr=False)  # `xtx` holds only its upper triangle
    #: once `damp` ran, `xtx` holds `scale · sum x xᵀ + diag(diag_add)` (the damped H) in place of the sum
    _diag_add: Optional[torch.Tensor] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.level == "hessian":
            self.xtx = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=self.device)
        elif self.level == "diag":
            self.x_sq = torch.zeros(self.columns, dtype=torch.float32, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a `[tokens, columns]` batch of inputs."""
        x = x.to(device=self.device, dtype=torch.float32)
        self.num_tokens += x.shape[0]
        if self.xtx is not None:
            cols = x.shape[1]
            if cols <= GRAM_BLOCK:
                self.xtx.addmm_(x.t(), x)
            else:  # upper block rows only: X[:, i:i+b]ᵀ X[:, i:]
                for i in range(0, cols, GRAM_BLOCK):
                    self.xtx[i : i + GRAM_BLOCK, i:].addmm_(x[:, i : i + GRAM_BLOCK].t(), x[:, i:])
                self._lower_stale = True
        elif self.x_sq is not None:
            self.x_sq.add_(x.square().sum(0))

    @property
    def has_hessian(self) -> bool:
        return self.xtx is not None

    @property
    def scale(self) -> float:
        """`2/N`: the factor from the sum `X Xᵀ` to the layer-wise Hessian."""
        return 2.0 / max(self.num_tokens, 1)

    @property
    def is_damped(self) -> bool:
        return self._diag_add is not None

    def gram(self) -> torch.Tensor:
        """`sum x xᵀ` over the calibration tokens (the stored tensor, symmetric); only before `damp`."""
        if self.xtx is None:
            raise RuntimeError("These statistics were collected without the Hessian (solver asked for 'diag').")
        if self.is_damped:
            raise RuntimeError("The sum was turned into the damped Hessian; use `gram_matmul`.")
        if self._lower_stale:  # mirror the accumulated upper triangle (idempotent: the upper part holds the sum)
            self.xtx.triu_()
            self.xtx.add_(self.xtx.triu(1).t())
            self._lower_stale = False
        return self.xtx

    def damp(self, diag_add: torch.Tensor) -> torch.Tensor:
        """Turn the stored sum into the damped Hessian `H + diag(diag_add)` in place and return it.

        No second `cols²` copy is kept: the sum's products stay available through `gram_matmul`. Calling it again
        with another `diag_add` (a stronger damping) only changes the diagonal.
        """
        if not self.is_damped:
            self.gram().mul_(self.scale)
            self._diag_add = torch.zeros(self.columns, dtype=torch.float32, device=self.xtx.device)
        self.xtx.diagonal().add_(diag_add - self._diag_add)
        self._diag_add = diag_add.clone()
        return self.xtx

    def gram_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ sum x xᵀ` (`x`: `[rows, cols]`), whichever form is stored."""
        if not self.is_damped:
            return x @ self.gram()
        return (x @ self.xtx - x * self._diag_add).div_(self.scale)

    def damped_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ (H + diag(diag_add))` after `damp`."""
        if not self.is_damped:
            raise RuntimeError("`damp` has not run: there is no damped Hessian yet.")
        return x @ self.xtx

    def damped_hessian(self) -> torch.Tensor:
        """The damped H itself (the stored tensor, not a copy: read only)."""
        if not self.is_damped:
            raise RuntimeError("`damp` has not run: there is no damped Hessian yet.")
        return self.xtx

    def damped_diagonal(self) -> torch.Tensor:
        if not self.is_damped:
            raise RuntimeError("`damp` has not run: there is no damped Hessian yet.")
        return torch.diagonal(self.xtx)

    def hessian(self) -> torch.Tensor:
        """`H = (2/N) X Xᵀ` (a fresh fp32 tensor)."""
        return self.gram() * self.scale

    def x_sq_mean(self) -> torch.Tensor:
        """Mean of x_j² over tokens (= diag(H) / 2)."""
        if self.xtx is not None:
            diag = torch.diagonal(self.xtx)
            if self.is_damped:
                return (diag - self._diag_add) / self.scale / max(self.num_tokens, 1)
        else:
            diag = self.x_sq
        if diag is None:
            raise RuntimeError("These statistics hold no activation sums (solver asked for 'none').")
        return diag / max(self.num_tokens, 1)

    def free(self) -> None:
        self.xtx = self.x_sq = self._diag_add = None
        self._hinv_cache.clear()


@dataclass
class LinearStatistics:
    """What a solver sees of one linear layer's calibration data."""

    inputs: InputStatistics
    seq_len: int
    y_sq: Optional[torch.Tensor] = None  # sum over tokens of y_i² (dense outputs)
    name: str = ""  # the module's full name, for error messages

    def add_output(self, y: torch.Tensor) -> None:
        y = y.to(device=self.inputs.device, dtype=torch.float32).square().sum(0)
        self.y_sq = y if self.y_sq is None else self.y_sq.add_(y)

    def x_norm(self) -> torch.Tensor:
        """Per-input-feature norm `sqrt(L) * x_rms` (see module docstring)."""
        return (self.inputs.x_sq_mean() * self.seq_len).sqrt()

    def y_norm(self) -> torch.Tensor:
        """Per-output-channel norm `sqrt(L) * y_rms` of the dense layer."""
        if self.y_sq is None:
            raise RuntimeError("No output statistics were collected for this layer.")
        return (self.y_sq / max(self.inputs.num_tokens, 1) * self.seq_len).sqrt()

    def rows(self, rows: Optional[slice]) -> "LinearStatistics":
        """View restricted to a block of output rows (for fused projections such as timm's qkv)."""
        if rows is None:
            return self
        return LinearStatistics(self.inputs, self.seq_len, None if self.y_sq is None else self.y_sq[rows], self.name)
