"""`StructuredConfig`: what to remove, how much, and how to choose and compensate it (validated on construction)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from ..errors import ConfigError
from ..methods.options import MethodOptions
from ..patterns import SparsityPattern

#: what a run removes: MLP channels, attention heads (whole key/value groups), MoE experts, or whole blocks
MODES = ("channels", "heads", "experts", "blocks")
#: the saliency methods each mode accepts; the first is the default
METHODS: dict[str, tuple[str, ...]] = {
    "channels": ("d2prune", "wanda", "magnitude", "flap"),
    "heads": ("d2prune", "wanda", "magnitude", "flap"),
    "experts": ("reap", "frequency"),
    "blocks": ("block_influence", "angular"),
}
#: how the consuming layer (down_proj / fc2 / o_proj) absorbs what was removed
COMPENSATIONS = ("least_squares", "bias", "none")
#: the compensation each method defaults to (FLAP's is its bias correction; the group-norm baselines have none)
DEFAULT_COMPENSATION = {"d2prune": "least_squares", "flap": "bias", "wanda": "none", "magnitude": "none"}
#: modes whose consumer can be compensated (experts and blocks have no consuming layer to refit)
COMPENSATED_MODES = ("channels", "heads")


@dataclass
class ShrinkOptions(MethodOptions):
    """The options of the `shrink` method (`D2PruneConfig(method="shrink", sparsity=ratio, method_options=...)`):
    what to remove and how to choose and compensate it."""

    group_name: ClassVar[str] = "`method_options` of shrink"

    mode: str = field(default="channels", metadata={"help": f"What to remove: one of {MODES}.", "choices": MODES})
    saliency: Optional[str] = field(
        default=None,
        metadata={"help": "How units are scored: channels/heads: d2prune (dual-Taylor + OBS group error), wanda "
                          "(|W|·‖x‖ group sums), magnitude (group L2 norm), flap (FLAP's fluctuation metric); experts: reap (routing "
                          "frequency x gate weight x expert output norm), frequency (routed-token counts); blocks: "
                          "block_influence (ShortGPT), angular (consecutive blocks by angular distance). None: the "
                          "first of each list."})
    compensation: Optional[str] = field(
        default=None,
        metadata={"help": "How the consuming layer absorbs the removed inputs (channels and heads): least_squares "
                          "(the kept weights refit on the calibration activations), bias (FLAP: the removed inputs' "
                          "mean contribution added to the bias), none. None: least_squares for d2prune, bias for "
                          "flap, none for wanda/magnitude."})
    add_bias: Optional[bool] = field(
        default=None,
        metadata={"help": "Give the consuming layer a bias where it has none and the family's config can add one "
                          "(LLaMA's `mlp_bias`/`attention_bias`), so the compensation can move the removed inputs' "
                          "mean into it. None: True for compensation='bias' (FLAP as published), else False."})
    damp_percent: float = field(
        default=0.01, metadata={"help": "Ridge of the least-squares refit and of the OBS saliency: fraction of "
                                        "mean(diag H) added to the diagonal of H."})
    lambda1: float = field(default=1.0, metadata={"help": "Weight of the first-order dual-Taylor term (d2prune)."})
    lambda2: float = field(default=0.0, metadata={"help": "Weight of the second-order dual-Taylor term (d2prune)."})
    activation_scale: Union[float, str] = field(
        default="auto",
        metadata={"help": 'Scale s of the dual-Taylor activation norms; "auto" = sqrt(512 * L) for calibration '
                          "length L (as the unstructured method)."})
    selection_rounds: int = field(
        default=32,
        metadata={"help": "d2prune with compensation chooses the groups greedily in this many rounds, each removing "
                          "the lowest-error groups and applying their OBS update before the next scores (more rounds: "
                          "closer to one-at-a-time selection, slower)."})
    channel_multiple: int = field(
        default=1,
        metadata={"help": "Keep the MLP width a multiple of this (e.g. 32 for llama.cpp's Q4_0/Q8_0 blocks, 256 for "
                          "its K-quants); also the step of the removable channel counts."})
    ratio_tolerance: float = field(
        default=0.005,
        metadata={"help": "Largest accepted distance between `ratio` and the nearest expressible ratio (absolute)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ConfigError(f"`mode` must be one of {MODES}, got {self.mode!r}.")
        allowed = METHODS[self.mode]
        if self.saliency is None:
            self.saliency = allowed[0]
        if self.saliency not in allowed:
            raise ConfigError(f"`saliency` {self.saliency!r} does not apply to mode {self.mode!r}: use one of "
                              f"{allowed}.")
        if self.compensation is None:
            self.compensation = DEFAULT_COMPENSATION.get(self.saliency, "none")
        if self.compensation not in COMPENSATIONS:
            raise ConfigError(f"`compensation` must be one of {COMPENSATIONS}, got {self.compensation!r}.")
        if self.compensation != "none" and self.mode not in COMPENSATED_MODES:
            raise ConfigError(f"mode {self.mode!r} has no consuming layer to compensate: set `compensation='none'` "
                              f"(compensation applies to {COMPENSATED_MODES}; use recovery distillation instead).")
        if self.add_bias is None:
            self.add_bias = self.compensation == "bias"
        if not isinstance(self.add_bias, bool):
            raise ConfigError(f"`add_bias` must be True, False or None, got {self.add_bias!r}.")
        if self.add_bias and self.compensation == "none":
            raise ConfigError("`add_bias=True` only serves a compensation: set `compensation` to 'bias' or "
                              "'least_squares', or `add_bias=False`.")
        _check_number("damp_percent", self.damp_percent, low=0.0, low_open=False)
        _check_number("lambda1", self.lambda1)
        _check_number("lambda2", self.lambda2)
        if self.activation_scale != "auto":
            _check_number("activation_scale", self.activation_scale, low=0.0)
            self.activation_scale = float(self.activation_scale)
        _check_int("selection_rounds", self.selection_rounds)
        _check_int("channel_multiple", self.channel_multiple)
        _check_number("ratio_tolerance", self.ratio_tolerance, low=0.0, low_open=False)

    def resolve_activation_scale(self, seq_len: int) -> float:
        """s for calibration sequences of `seq_len` tokens (`"auto"`: sqrt(512·L), as the unstructured method)."""
        if self.activation_scale == "auto":
            return float((512 * max(seq_len, 1)) ** 0.5)
        return float(self.activation_scale)

    def resolved(self, pattern: SparsityPattern) -> "ShrinkOptions":
        """Whole units are removed: an N:M pattern has no meaning here."""
        if pattern.is_nm:
            raise ConfigError(f"method='shrink' removes whole channels, heads, experts or blocks: give the fraction of "
                              f"block parameters to remove as `sparsity`, not an N:M pattern ({pattern.structure}).")
        return self


@dataclass
class StructuredConfig(ShrinkOptions):
    """Settings of one structured shrink: the result is a smaller dense model with a standard config.

    `ratio` is the fraction of the *block* parameters (everything inside the decoder/encoder layers; embeddings and
    heads excluded) to remove. Each mode removes whole units, the same number in every block, so only some ratios
    can be expressed: a ratio farther than `ratio_tolerance` from the nearest expressible one is refused before any
    work, with the nearest valid values in the message (`valid_ratios` lists them).
    """

    group_name: ClassVar[str] = "`StructuredConfig`"

    ratio: float = field(default=0.2, metadata={"help": "Fraction of the block parameters to remove, in (0, 1)."})
    device: Optional[str] = field(
        default=None, metadata={"help": "Where statistics and solves run (default: the model's device)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise ConfigError(f"`ratio` must be a number in (0, 1) (the fraction of block parameters to remove), "
                              f"got {self.ratio!r}.")
        self.ratio = float(self.ratio)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "StructuredConfig":
        return cls.build(values)


def _check_number(name: str, value: Any, low: Optional[float] = None, low_open: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"`{name}` must be a number, got {value!r}.")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"`{name}` must be {'>' if low_open else '>='} {low}, got {value!r}.")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"`{name}` must be a positive integer, got {value!r}.")
