"""How the consuming layer absorbs removed inputs: a damped least-squares refit of the kept weights, or FLAP's bias.

With `H = X Xᵀ` over the consumer's inputs on the calibration tokens, kept inputs K and removed inputs R, the weights
`W'_K` minimising `‖W X − W'_K X_K‖²` are `W_K + W_R H_RK H_KK⁻¹`; the damping adds `damp·mean(diag H)` to the
diagonal of `H_KK` (a ridge towards the unchanged `W_K`). A bias is the weight of a constant input 1: with the sums
of `ConsumerStatistics.augmented_gram` the same formula refits the bias too (never damped, never removed). FLAP's
compensation instead keeps `W_K` and adds the removed inputs' mean contribution `W_R · mean(x_R)` to the bias.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


def damping(gram: torch.Tensor, damp_percent: float, features: Optional[int] = None) -> torch.Tensor:
    """The diagonal added to `gram`: `damp·mean(diag)` on the first `features` inputs (all by default), 0 on the
    rest (the constant input of an augmented gram)."""
    n = gram.shape[0]
    features = n if features is None else features
    diag = torch.diagonal(gram)[:features]
    mean = diag.mean() if features else gram.new_zeros(())
    out = torch.zeros(n, dtype=gram.dtype, device=gram.device)
    out[:features] = damp_percent * mean
    out[:features] += (diag == 0).to(gram.dtype)  # never-active inputs: a unit diagonal keeps H invertible
    return out


def cholesky(matrix: torch.Tensor, extra: torch.Tensor, what: str = "H") -> torch.Tensor:
    """Lower Cholesky factor of `matrix + diag(extra)`; on failure the damping is multiplied by 10 (logged), up to
    `MAX_DAMP_RETRIES` times (from a tiny ridge when `extra` is zero), then a `RuntimeError` says what to do."""
    tiny = 1e-8 * float(torch.diagonal(matrix).abs().mean()) or 1e-12
    ridge = extra if bool(extra.any()) else torch.full_like(extra, tiny)
    attempts = [extra] + [ridge * 10.0**k for k in range(1, MAX_DAMP_RETRIES + 1)]
    for k, add in enumerate(attempts):
        if k:
            logger.warning("Cholesky of %s failed; retrying with %g times the damping.", what, 10.0**k)
        factor, info = torch.linalg.cholesky_ex(matrix + torch.diag(add))
        if int(info) == 0 and bool(torch.isfinite(torch.diagonal(factor)).all()):
            return factor
    raise RuntimeError(f"{what} is not positive definite even with 10^{MAX_DAMP_RETRIES} times the damping. Use more "
                       "calibration tokens, or raise `damp_percent`.")


def least_squares_refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp_percent: float,
                        features: Optional[int] = None) -> torch.Tensor:
    """`W_K + W_R H_RK (H_KK + δ)⁻¹`: the kept columns of `weight [rows, n]` refit to the full layer's output.

    `gram [n, n]` is `X Xᵀ` (or the augmented sums, with `features` = the number of real inputs: the rest is not
    damped). Returns `[rows, len(keep)]` in the dtype of `gram`.
    """
    n = gram.shape[0]
    dtype = gram.dtype
    w = weight.to(dtype)
    removed = torch.ones(n, dtype=torch.bool, device=gram.device)
    removed[keep] = False
    removed_idx = removed.nonzero().squeeze(1)
    w_kept = w[:, keep]
    if removed_idx.numel() == 0:
        return w_kept.clone()
    extra = damping(gram, damp_percent, features)[keep]
    factor = cholesky(gram[keep][:, keep], extra, "the kept inputs' H")
    rhs = gram[keep][:, removed_idx] @ w[:, removed_idx].t()  # H_KR W_Rᵀ: [k, rows]
    return w_kept + torch.cholesky_solve(rhs, factor).t()


def bias_shift(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation: `W_R · mean(x_R)` (`[rows]`), to be added to the bias."""
    return weight[:, removed].to(mean.dtype) @ mean[removed]


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """`Σ_tokens ‖ΔW x‖² = tr(ΔW H ΔWᵀ)` for `delta [rows, n]` and the sums `gram [n, n]`."""
    d = delta.to(gram.dtype)
    return float(((d @ gram) * d).sum())
