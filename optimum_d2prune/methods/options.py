"""The knobs shared by the built-in methods: every method's (`MethodOptions`) and the OBS solver's (`ObsOptions`,
SparseGPT and D²Prune). No torch here: the command line builds its flags from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from ..errors import ConfigError
from ..patterns import SparsityPattern
from ..validation import OptionGroup, as_bool, as_float, as_int


@dataclass
class MethodOptions(OptionGroup):
    """Options every method has."""

    group_name: ClassVar[str] = "`method_options`"

    min_expert_tokens: int = field(
        default=16,
        metadata={"help": "MoE: an expert that received fewer calibration tokens is pruned with Wanda's criterion "
                          "(magnitude if it received none) instead of the method's solver; the report lists them."},
    )

    def __post_init__(self) -> None:
        self.min_expert_tokens = as_int("min_expert_tokens", self.min_expert_tokens, 0)

    def resolved(self, pattern: SparsityPattern) -> "MethodOptions":
        """The options with every value that depends on the sparsity pattern made concrete (checked against it)."""
        return self

    def refit_settings(self) -> "RefitSettings":
        """What a block-level refit borrows from the method when not told otherwise (`ReconstructionOptions`)."""
        return RefitSettings()


@dataclass(frozen=True)
class RefitSettings:
    """Steps, stopping tolerance and Hessian dampening of a least-squares refit."""

    steps: int = 16
    tolerance: float = 0.15
    damp_percent: float = 0.01


@dataclass
class ObsOptions(MethodOptions):
    """The OBS solver (SparseGPT's sweep), its least-squares refit and its ADMM mask search."""

    block_size: int = field(default=128, metadata={"help": "Columns per lazy-update block of the OBS sweep."})
    damp_percent: float = field(default=0.01, metadata={"help": "Hessian dampening, fraction of mean(diag H)."})
    refit_steps: int = field(
        default=0,
        metadata={"help": "Conjugate-gradient steps of the least-squares refit of the surviving weights after the OBS "
                          "sweep (0: plain SparseGPT)."},
    )
    refit_tolerance: float = field(
        default=0.15,
        metadata={"help": "Stop the refit once its preconditioned residual is below this fraction of the initial one "
                          "(`refit_steps` is then the maximum); 0: always `refit_steps` steps."},
    )
    refit_budget: bool = field(
        default=True,
        metadata={"help": "Cap the refit steps of each matrix at calibration tokens / rows - 1, so that the refit never "
                          "costs more than accumulating the Hessian."},
    )
    admm_steps: int = field(
        default=0,
        metadata={"help": "ADMM steps (ALPS) that re-select the mask of every weight-updated matrix, started from the "
                          "OBS solution, before the refit (0: off); with block reconstruction, the reconstructed "
                          "projections run them on the block objective instead."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.block_size = as_int("block_size", self.block_size, 1)
        self.damp_percent = as_float("damp_percent", self.damp_percent, 0.0, 1.0, low_open=True)
        self.refit_steps = as_int("refit_steps", self.refit_steps, 0)
        self.refit_tolerance = as_float("refit_tolerance", self.refit_tolerance, 0.0, 1.0)
        self.refit_budget = as_bool("refit_budget", self.refit_budget)
        self.admm_steps = as_int("admm_steps", self.admm_steps, 0)

    def resolved(self, pattern: SparsityPattern) -> "ObsOptions":
        """N:M masks are chosen inside the sweep's column blocks: refuse a block size M does not divide. Without a
        refit its budget has no effect: it reads as the default."""
        if not self.refit_steps and not self.refit_budget:
            return replace(self, refit_budget=True).resolved(pattern)
        if pattern.is_nm and self.block_size % pattern.m:
            suggestion = max(pattern.m, self.block_size // pattern.m * pattern.m)
            raise ConfigError(
                f"`block_size` ({self.block_size}) is not a multiple of M={pattern.m} for {pattern.structure}: the OBS "
                f"sweep needs whole groups of M inputs in each column block; set `block_size` to a multiple of "
                f"{pattern.m} (e.g. {suggestion})."
            )
        return self

    def refit_settings(self) -> RefitSettings:
        return RefitSettings(self.refit_steps or RefitSettings.steps, self.refit_tolerance, self.damp_percent)

