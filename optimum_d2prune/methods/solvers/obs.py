"""OBS weight-update solver: SparseGPT, and D²-SparseGPT when the dual-Taylor terms are on."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from ...calibration.statistics import InputStatistics, LinearStatistics
from ...masks import lowest_k_mask, nm_mask
from ...patterns import SparsityPattern, group_zero_counts
from .admm import admm_support
from .base import DualTaylor, LayerProblem, Solver, SolverOutput

logger = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6
#: a row keeps plain masking only when the OBS update is worse by more than this relative margin
MASKING_MARGIN = 1e-2


def inverse_hessian_cholesky(stats: LinearStatistics, damp_percent: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of `(H + damp·mean(diag H)·I)⁻¹` and the dead-input mask, cached on the statistics.

    Linears that read the same input (q/k/v, gate/up) share the factorisation. Memory: the statistics' sum becomes
    the damped `H` in place (`InputStatistics.damp`) and the factor is computed in one more buffer, in place, so a
    stream holds two `cols²` fp32 matrices at its peak, not four. If the Cholesky fails, the damping is multiplied by
    10 and the failure logged, up to `MAX_DAMP_RETRIES` times; then a `RuntimeError` is raised.
    """
    cache = stats.inputs._hinv_cache
    if damp_percent in cache:
        return cache[damp_percent]
    inputs = stats.inputs
    where = f" of `{stats.name}`" if stats.name else ""
    diag = inputs.x_sq_mean() * 2.0  # diag(H)
    if not bool(torch.isfinite(diag).all()):
        raise ValueError(
            f"The calibration Hessian{where} holds NaN or Inf: the layer's inputs are not finite (a NaN/Inf weight "
            "or an overflow earlier in the model). Check the model's weights, or prune in float32."
        )
    dead = diag == 0
    fix = dead.to(torch.float32)  # H_jj = 1 for never-active inputs, so that H stays invertible
    mean_diag = (diag + fix).mean()
    damp = damp_percent
    info = torch.empty((), dtype=torch.int32, device=diag.device)
    factor: Optional[torch.Tensor] = None
    for attempt in range(MAX_DAMP_RETRIES + 1):
        factor = None  # a failed attempt's buffer is released before the next one is made
        factor = inputs.damp(fix + damp * mean_diag).clone()
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if info == 0:
            torch.cholesky_inverse(factor, out=factor)
            torch.linalg.cholesky_ex(factor, upper=True, out=(factor, info))
            if info == 0 and bool(torch.isfinite(torch.diagonal(factor)).all()):
                break
        if attempt == MAX_DAMP_RETRIES:
            raise RuntimeError(
                f"The Hessian{where} is not positive definite even with damping {damp:g}·mean(diag H). Use more "
                "calibration tokens, or raise `damp_percent`."
            )
        logger.warning("Cholesky failed with damping %g·mean(diag H); retrying with %g.", damp, damp * 10)
        damp *= 10
    cache.clear()  # the damped H now belongs to this damping
    cache[damp_percent] = (factor, dead)
    return factor, dead


@dataclass
class OBSSolver(Solver):
    """Blockwise OBS pruning with lazy batch updates (SparseGPT), mask chosen by the dual-Taylor saliency.

    The base saliency is SparseGPT's `w² / [chol(H⁻¹)]_jj²`, evaluated on the current (already updated) weights of
    each column block; masks are compared over the whole block of `block_size` columns (unstructured) or within
    each group of M inputs (N:M). Inside a block, the column-by-column OBS recursion is solved for all rows at once
    as a batched unit-lower-triangular system, which gives the same result as SparseGPT's Python loop.
    """

    dual_taylor: DualTaylor = field(default_factory=DualTaylor)
    block_size: int = 128
    damp_percent: float = 0.01
    refit_steps: int = 0
    refit_tolerance: float = 0.0  # > 0: stop the refit once converged (`refit_steps` is then the maximum)
    #: cap the refit at `calibration tokens / rows - 1` steps, so that it never costs more than accumulating the
    #: Hessian (`(steps + 1)·rows·cols²` with the initial residual, against `tokens·cols²`)
    refit_budget: bool = False
    #: also select the baseline mask of each segment to count the entries the dual-Taylor terms change (a
    #: diagnostic: a second kthvalue/sort per segment)
    measure_flips: bool = False
    #: ADMM steps that re-select the mask from the sweep's solution before the refit (`admm.py`); 0: off
    admm_steps: int = 0

    statistics = "hessian"
    updates_weights = True

    @property
    def name(self) -> str:  # type: ignore[override]
        name = "d2-sparsegpt" if self.dual_taylor.active else "sparsegpt"
        name = f"{name}+admm" if self.admm_steps else name
        return f"{name}+refit" if self.refit_steps else name

    def prune(self, weight: torch.Tensor, stats: Optional[LinearStatistics], pattern: SparsityPattern) -> SolverOutput:
        if stats is None:
            raise ValueError(f"{self.name} needs calibration statistics.")
        if pattern.is_nm and self.block_size % pattern.m:
            raise ValueError(f"`block_size` ({self.block_size}) must be a multiple of M={pattern.m} for "
                             f"{pattern.structure}.")
        upper, dead = inverse_hessian_cholesky(stats, self.damp_percent)
        w = weight.detach().to(device=upper.device, dtype=torch.float32).clone()
        # dead inputs (never active: H_jj = 0) do not change the output whatever their weight: they are pruned
        # first, inside the mask and its exact count; those beyond the count keep their (harmless) value
        rows, cols = w.shape
        dual = self.dual_taylor if self.dual_taylor.active else None
        x_norm, y_norm = dual.prepare(stats) if dual else (None, None)
        mask = torch.zeros_like(w, dtype=torch.bool)
        flipped = 0
        starts = list(range(0, cols, self.block_size))
        sizes = [min(self.block_size, cols - s) for s in starts]
        block_counts = group_zero_counts(pattern.sparsity, [rows * s for s in sizes])
        for i1, size, k in zip(starts, sizes, block_counts):
            i2 = i1 + size
            u = upper[i1:i2, i1:i2]
            w1 = w[:, i1:i2]
            err = torch.zeros_like(w1)
            seg = pattern.m if pattern.is_nm else size
            linear, quadratic = dual.coefficients(x_norm[i1:i2], y_norm) if dual else (None, None)
            for s1 in range(0, size, seg):
                s2 = s1 + seg
                # current values of this segment after the in-block updates of the columns before it
                cur = w1[:, s1:s2] - err[:, :s1] @ u[:s1, s1:s2] if s1 else w1[:, s1:s2].clone()
                base = cur.square() / torch.diagonal(u)[s1:s2].square()
                score = base + dual.apply(cur, None if linear is None else linear[:, s1:s2],
                                          None if quadratic is None else quadratic[s1:s2]) if dual else base
                seg_dead = dead[i1 + s1 : i1 + s2]
                if bool(seg_dead.any()):
                    base, score = base.clone(), score.clone()
                    base[:, seg_dead] = score[:, seg_dead] = float("-inf")
                m = nm_mask(score, pattern.n, pattern.m) if pattern.is_nm else lowest_k_mask(score, k)
                if dual and self.measure_flips:
                    reference = nm_mask(base, pattern.n, pattern.m) if pattern.is_nm else lowest_k_mask(base, k)
                    flipped += int((m & ~reference).sum())
                mask[:, i1 + s1 : i1 + s2] = m
                err[:, s1:s2] = _obs_segment_errors(cur, m, u[s1:s2, s1:s2])
            # pruned block: in-block updates applied, pruned entries zeroed; lazy update of the columns after it
            new_block = w1 - err @ torch.triu(u, diagonal=1)
            new_block[mask[:, i1:i2]] = 0
            w[:, i1:i2] = new_block
            w[:, i2:].addmm_(err, upper[i1:i2, i2:], alpha=-1)  # in place: no [rows, cols] temporary
        flipped = flipped if dual and self.measure_flips else None
        if self.refit_steps or self.admm_steps:  # the error is measured after the refit only
            return self.refit(weight, SolverOutput(w, mask, float("nan"), flipped), stats, pattern)
        w, error = no_worse_than_masking(weight, w, mask, stats)
        return SolverOutput(w, mask, error, flipped)

    def without_refit(self) -> "OBSSolver":
        return replace(self, refit_steps=0, admm_steps=0)

    def steps_for(self, weight: torch.Tensor, stats: LinearStatistics) -> int:
        """The refit steps for this matrix: `refit_steps`, capped by the budget when `refit_budget` is set."""
        if not self.refit_budget:
            return self.refit_steps
        return max(0, min(self.refit_steps, stats.inputs.num_tokens // max(weight.shape[0], 1) - 1))

    def refit(self, weight: torch.Tensor, out: SolverOutput, stats: Optional[LinearStatistics],
               pattern: SparsityPattern) -> SolverOutput:
        """ADMM re-selection of `out`'s mask (`admm_steps`), then the least-squares refit of its surviving weights
        (see `refit_surviving_weights`)."""
        if self.admm_steps:
            _, dead = inverse_hessian_cholesky(stats, self.damp_percent)  # the statistics now hold the damped H
            w, mask = admm_support(LayerProblem(weight, stats.inputs.damped_hessian(), dead=dead), out.weight,
                                   out.mask, pattern, self.admm_steps)
            out = SolverOutput(w, mask, float("nan"), out.flipped)
        steps = self.steps_for(weight, stats) if self.refit_steps else 0
        if not steps:
            if out.error == out.error:  # already final (a candidate solved without the refit)
                return out
            w, error = no_worse_than_masking(weight, out.weight, out.mask, stats)
            return SolverOutput(w, out.mask, error, out.flipped)
        inverse_hessian_cholesky(stats, self.damp_percent)  # makes the statistics hold the damped H
        # dead inputs outside the mask have no gradient (their Hessian row is diagonal): the refit keeps them
        w = refit_surviving_weights(LayerProblem(weight, stats.inputs), out.weight, out.mask, steps,
                                    self.refit_tolerance)
        w, error = no_worse_than_masking(weight, w, out.mask, stats)
        return SolverOutput(w, out.mask, error, out.flipped)


def no_worse_than_masking(
    weight: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor, stats: LinearStatistics
) -> tuple[torch.Tensor, float]:
    """`pruned`, except rows where zeroing the same mask without any update has a lower layer error; and the
    relative error (`relative_error`) of the result.

    The OBS sweep compensates each pruned column as if the errors made before it were not there, so on small or
    badly conditioned layers (e.g. 1x6 at 2:6) a row can end a few percent worse than plain masking. The error
    is a sum over rows, so the per-row choice guarantees the solve is never worse than mask-only pruning by more
    than `MASKING_MARGIN` (relative). The per-row errors computed for the choice also give the reported error.
    """
    error = 0.0
    kept = 0
    for r1, r2 in row_chunks(pruned):  # bounded temporaries: a few [chunk, cols] matrices
        dense = weight[r1:r2].detach().to(pruned.device, torch.float32)
        d_obs = dense - pruned[r1:r2]
        d_mask = dense * mask[r1:r2]  # what plain masking removes (`dense` may be the weight itself)
        err_obs = (stats.inputs.gram_matmul(d_obs) * d_obs).sum(1)
        err_mask = (stats.inputs.gram_matmul(d_mask) * d_mask).sum(1)
        # a margin keeps near-ties on the OBS result, so summation-order noise (data-parallel ranks) cannot flip rows
        worse = err_obs > err_mask * (1 + MASKING_MARGIN)
        error += float(torch.where(worse, err_mask, err_obs).sum())
        if bool(worse.any()):
            masked = weight[r1:r2].detach().to(pruned.device, torch.float32).masked_fill(mask[r1:r2], 0)
            pruned[r1:r2][worse] = masked[worse]
            kept += int(worse.sum())
    if kept:
        logger.debug("%s: %d row(s) kept plain masking (lower error than the OBS update).", stats.name, kept)
    den = float(stats.y_sq.sum()) if stats.y_sq is not None else float("nan")
    return pruned, (error / den if den > 0 else 0.0)


#: rows of a weight processed together by the row-wise steps (masking check, refit): bounds their temporaries
ROW_CHUNK_ELEMENTS = 1 << 22


def row_chunks(matrix: torch.Tensor) -> list[tuple[int, int]]:
    """Row ranges of about `ROW_CHUNK_ELEMENTS` entries (16 MiB of fp32) each."""
    rows, cols = matrix.shape
    step = max(1, ROW_CHUNK_ELEMENTS // max(cols, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


#: columns of the sweep's sub-blocks, and the most entries of one batched `[rows, sub, sub]` triangular system
SWEEP_SUB_BLOCK = 32
SWEEP_SYSTEM_ELEMENTS = 1 << 24  # ~64 MB of fp32


def _obs_segment_errors(cur: torch.Tensor, mask: torch.Tensor, u: torch.Tensor,
                        sub: int = SWEEP_SUB_BLOCK) -> torch.Tensor:
    """Scaled OBS errors `e` of a segment, all rows at once.

    SparseGPT's loop sets, column by column, `e_i = m_i · w_i / u_ii` with `w_i` the column after the updates
    `w_i -= e_k u_ki` of the earlier columns k < i. The segment is cut into sub-blocks of `sub` columns: the updates
    from earlier sub-blocks are one matrix product, and inside a sub-block the recursion is, per row, the
    unit-lower-triangular system `(I + diag(m/u_diag) · triu(u, 1)ᵀ) e = (m/u_diag) · w`, solved for every row in
    one batched call (building these per-row systems costs rows·n·sub, not rows·n²).
    """
    n = cur.shape[1]
    if n > sub:
        out = torch.empty_like(cur)
        for s1 in range(0, n, sub):
            s2 = min(s1 + sub, n)
            seg = cur[:, s1:s2] - out[:, :s1] @ u[:s1, s1:s2] if s1 else cur[:, s1:s2]
            out[:, s1:s2] = _obs_segment_errors(seg, mask[:, s1:s2], u[s1:s2, s1:s2], sub)
        return out
    d = mask.to(cur.dtype) / torch.diagonal(u)
    if n == 1:
        return d * cur
    strict_t = torch.triu(u, diagonal=1).t()
    out = torch.empty_like(cur)
    chunk = max(1, SWEEP_SYSTEM_ELEMENTS // (n * n))  # bound the batched system
    for r1 in range(0, cur.shape[0], chunk):
        r2 = r1 + chunk
        dr = d[r1:r2]
        system = dr.unsqueeze(2) * strict_t.unsqueeze(0)
        system.diagonal(dim1=1, dim2=2).fill_(1.0)
        rhs = (dr * cur[r1:r2]).unsqueeze(2)
        out[r1:r2] = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True).squeeze(2)
    return out


def refit_surviving_weights(problem: LayerProblem, start: torch.Tensor, pruned: torch.Tensor, steps: int,
                            tolerance: float = 0.0) -> torch.Tensor:
    """Least-squares refit of the surviving weights for a fixed mask: per row, minimise `(w - w0) H (w - w0)ᵀ`
    with the pruned entries held at zero (`problem`: w0 and H, or the right-hand side `target` of `w H = target`).

    SparseGPT's sweep only moves weights to the right of each pruned column, so it stops short of this optimum.
    Solved for all rows at once by Jacobi-preconditioned conjugate gradients started from the sweep's result
    (at most `steps` iterations, each one `[rows, cols] @ [cols, cols]` product); every step lowers the (damped)
    objective. `problem.hessian` is the damped H, or statistics holding it (`InputStatistics.damp`). Rows are solved
    in chunks (`row_chunks`) to bound the temporaries. With `tolerance > 0` a chunk stops as soon as its
    preconditioned residual, summed over its rows, is below `tolerance²` times its initial value
    (`‖r‖_{D⁻¹} ≤ tolerance · ‖r0‖_{D⁻¹}`): converged instead of a fixed count.

    The block-level reconstruction fits `W' X_pruned` to `W_dense X_dense` with `target = W_dense · X_dense X_prunedᵀ`
    and `hessian = X_pruned X_prunedᵀ` (refine/reconstruction.py).
    """
    hessian, dense, target = problem.hessian, problem.dense, problem.target
    if isinstance(hessian, InputStatistics):
        matmul, diagonal = hessian.damped_matmul, hessian.damped_diagonal()
    else:
        matmul, diagonal = (lambda x: x @ hessian), torch.diagonal(hessian)
    out = torch.empty_like(start)
    for r1, r2 in row_chunks(start):  # rows are independent problems: bounded temporaries
        rows = _Rows(dense[r1:r2], pruned[r1:r2], None if target is None else target[r1:r2])
        out[r1:r2] = _refit_rows(rows, start[r1:r2], matmul, 1.0 / diagonal, (steps, tolerance))
    return out


@dataclass
class _Rows:
    """A chunk of rows of the refit: their dense weights, mask and (optional) right-hand side."""

    dense: torch.Tensor
    pruned: torch.Tensor
    target: Optional[torch.Tensor]


def _refit_rows(rows: _Rows, start: torch.Tensor, matmul: Callable, inv_diag: torch.Tensor,
                budget: tuple[int, float]) -> torch.Tensor:
    dense, pruned, target = rows.dense, rows.pruned, rows.target
    steps, tolerance = budget
    keep = (~pruned).to(start.dtype)
    w = start.clone()
    if target is None:
        residual = matmul(dense.detach().to(start.device, torch.float32) - w) * keep  # negative gradient
    else:
        residual = (target.to(w.device, torch.float32) - matmul(w)) * keep
    z = residual * inv_diag
    direction = z.clone()
    rz = _row_dot(residual, z)
    tiny = torch.finfo(torch.float32).tiny
    stop = tolerance**2 * float(rz.sum()) if tolerance > 0 else None
    for _ in range(steps):  # in place: one [rows, cols] product and a few elementwise passes per step
        if stop is not None and float(rz.sum()) <= stop:
            break
        hd = matmul(direction).mul_(keep)
        alpha = rz / _row_dot(direction, hd).clamp_min(tiny)
        w.addcmul_(alpha, direction)
        residual.addcmul_(alpha, hd, value=-1.0)
        torch.mul(residual, inv_diag, out=z)
        rz_next = _row_dot(residual, z)
        direction.mul_(rz_next / rz.clamp_min(tiny)).add_(z)
        rz = rz_next
    return w.mul_(keep)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot products `[rows, 1]` (a product and a sum: faster on CPU than einsum or vecdot)."""
    return (a * b).sum(1, keepdim=True)
