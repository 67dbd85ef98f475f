"""Options of the allocation rules (how the target sparsity is shared between blocks) and of the block-level
reconstruction. No torch here: the configuration and the command line read these fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from ..methods.options import RefitSettings
from ..patterns import SparsityPattern
from ..validation import OptionGroup, as_choice, as_float, as_int


@dataclass
class UniformOptions(OptionGroup):
    """Every block gets the configured sparsity (no options)."""

    group_name: ClassVar[str] = '`allocation_options` of "uniform"'

    def applies(self, pattern: SparsityPattern) -> bool:
        return False


@dataclass
class OwlOptions(OptionGroup):
    """OWL (Yin et al. 2024): blocks whose Wanda metric has more outliers keep more weights."""

    group_name: ClassVar[str] = '`allocation_options` of "owl"'

    deviation: float = field(
        default=0.08,
        metadata={"help": "OWL's λ: block budgets lie within sparsity ± 2λ, usually ± λ."})
    outlier_threshold: float = field(
        default=5.0,
        metadata={"help": "OWL's M: an entry is an outlier above M × its block's mean metric (OWL uses 3-10)."})
    min_sparsity: float = field(
        default=0.0,
        metadata={"help": "Below this sparsity every block gets the same budget (OWL helps at high sparsity only; "
                          "docs/decisions.md)."})

    def __post_init__(self) -> None:
        self.deviation = as_float("deviation", self.deviation, 0.0, 0.5)
        self.outlier_threshold = as_float("outlier_threshold", self.outlier_threshold, 0.0, low_open=True)
        self.min_sparsity = as_float("min_sparsity", self.min_sparsity, 0.0, 1.0)

    def applies(self, pattern: SparsityPattern) -> bool:
        """Whether budgets differ between blocks: unstructured sparsity from `min_sparsity` on (an N:M pattern has
        the same sparsity everywhere by definition)."""
        return not pattern.is_nm and pattern.sparsity >= self.min_sparsity and self.deviation > 0


#: allocation rule name -> its options (the rules themselves: `refine.allocation.ALLOCATION_RULES`)
ALLOCATION_OPTIONS: dict[str, type] = {"uniform": UniformOptions, "owl": OwlOptions}

RECONSTRUCTION_TARGETS = ("outputs", "all")
RECONSTRUCTION_REFERENCES = ("block", "model")


@dataclass
class ReconstructionOptions(OptionGroup):
    """Block-level reconstruction: after a block's layers are pruned, refit its output projections so that the
    pruned block reproduces the dense block's output."""

    group_name: ClassVar[str] = "`reconstruction_options`"

    targets: str = field(
        default="outputs",
        metadata={"help": 'What is refit: "outputs": the output projections (attention output, last MLP linear); '
                          '"all": also every other linear whose input the block\'s pruning changes (all but q/k/v).',
                  "choices": RECONSTRUCTION_TARGETS})
    reference: str = field(
        default="block",
        metadata={"help": 'What the last output projection is refit to: "block": the dense block\'s output on the pruned '
                          'model\'s activations; "model": the dense model\'s block output (also takes out the error '
                          "accumulated before the block; a second copy of the activations and one more forward per "
                          "block; post-norm blocks keep \"block\").", "choices": RECONSTRUCTION_REFERENCES})
    refit_steps: Optional[int] = field(
        default=None, metadata={"help": "Conjugate-gradient steps of the refit (default: the method's refit steps, "
                                        "16 when it has none)."})
    refit_tolerance: Optional[float] = field(
        default=None, metadata={"help": "Relative residual at which the refit stops (default: the method's)."})
    damp_percent: Optional[float] = field(
        default=None, metadata={"help": "Dampening of the refit's Gram matrix (default: the method's, 0.01)."})

    def __post_init__(self) -> None:
        self.targets = as_choice("targets", self.targets, RECONSTRUCTION_TARGETS)
        self.reference = as_choice("reference", self.reference, RECONSTRUCTION_REFERENCES)
        if self.refit_steps is not None:
            self.refit_steps = as_int("refit_steps", self.refit_steps, 1)
        if self.refit_tolerance is not None:
            self.refit_tolerance = as_float("refit_tolerance", self.refit_tolerance, 0.0, 1.0)
        if self.damp_percent is not None:
            self.damp_percent = as_float("damp_percent", self.damp_percent, 0.0, 1.0, low_open=True)

    def resolved(self, method: RefitSettings) -> "ReconstructionOptions":
        """Every unset refit value taken from the method's `RefitSettings`."""
        values: dict[str, Any] = self.to_dict()
        for name, default in (("refit_steps", method.steps), ("refit_tolerance", method.tolerance),
                              ("damp_percent", method.damp_percent)):
            if values[name] is None:
                values[name] = default
        return ReconstructionOptions(**values)
