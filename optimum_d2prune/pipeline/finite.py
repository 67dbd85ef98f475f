"""NaN/Inf checks: a non-finite weight, activation or statistic is found in the block where it appears.

Without them a NaN surfaces blocks later as a "Hessian not positive definite" error that blames the calibration
data, or ends in a saved NaN model. Weights of the whole model are checked before block 0; the hidden states
entering each block and the statistics of each targeted module are checked before that block is solved.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from ..errors import InputError

logger = logging.getLogger(__name__)

_CHECK = "Check the model's weights and dtype (float16 overflows: try bfloat16 or float32)"
_WHAT_TO_DO = _CHECK + ', or pass `on_nonfinite="skip"` to leave such modules unpruned.'


class NonFiniteError(InputError):
    """NaN or Inf where a pruning run needs finite numbers."""


def is_finite(t: Optional[torch.Tensor]) -> bool:
    """True for None, meta tensors (not materialised) and tensors without NaN/Inf."""
    return t is None or t.is_meta or bool(torch.isfinite(t).all())


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of `model` holding NaN or Inf (meta tensors are not checked)."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in named if t.is_floating_point() and not is_finite(t)]


def check_model_weights(model: nn.Module, targets: set[str], action: str) -> None:
    """Before block 0: raise on any non-finite parameter, except targeted weights when `action="skip"` (those
    are skipped in their block)."""
    bad = nonfinite_parameters(model)
    if action == "skip":
        bad = [name for name in bad if name.rsplit(".", 1)[0] not in targets]
    if bad:
        shown = ", ".join(f"`{n}`" for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"{len(bad)} tensor(s) of the model hold NaN or Inf: {shown}. Nothing was pruned. "
                             + _WHAT_TO_DO)


def check_hidden_states(hidden: list[torch.Tensor], block: int) -> None:
    """The hidden states entering `block` (one tensor per calibration batch) must be finite."""
    for i, h in enumerate(hidden):
        if not is_finite(h):
            raise NonFiniteError(
                f"The hidden states entering block {block} hold NaN or Inf (calibration batch {i}); blocks before it "
                "are pruned in memory only: do not save this model. " + _CHECK + "."
            )


def _problem(weight: torch.Tensor, stats) -> Optional[str]:
    if not is_finite(weight):
        return "its weight holds NaN or Inf"
    if stats is not None:
        inputs = stats.inputs
        tensors = (inputs.gram() if inputs.has_hessian else None, inputs.x_sq, stats.y_sq)
        if not all(is_finite(t) for t in tensors):
            return "its calibration statistics hold NaN or Inf (its inputs or outputs are not finite)"
    return None


def screen_targets(block: int, targets: list, stats: dict, action: str, report) -> list:
    """The targets of `block` whose weight and statistics are finite. Any other one raises `NonFiniteError`
    naming the block and module, or with `action="skip"` is left as it is and recorded in `report.skipped`."""
    kept = []
    for t in targets:
        problem = _problem(t.weight(), stats.get(t.module_name))
        if problem is None:
            kept.append(t)
            continue
        if action != "skip":
            raise NonFiniteError(f"Block {block}, `{t.name}`: {problem}. " + _WHAT_TO_DO)
        logger.warning("Block %d, `%s`: %s; left unpruned (on_nonfinite='skip').", block, t.name, problem)
        report.skipped[t.name] = problem
    return kept
