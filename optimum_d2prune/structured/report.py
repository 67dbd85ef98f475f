"""`ShrinkReport`: what a structured shrink removed, what it cost in layer error, and what the config became."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class UnitRecord:
    """The units removed from one block (channels, key/value groups or experts)."""

    block: int
    kind: str  # "mlp", "attention" or "experts"
    units: int  # before the shrink
    removed: list[int]
    #: relative output error of the consumer on the calibration data, `‖ΔY‖² / ‖Y‖²`: removed inputs zeroed, and after
    #: the compensation (equal without one)
    error_masked: Optional[float] = None
    error: Optional[float] = None


@dataclass
class ShrinkReport:
    """The outcome of `shrink`."""

    mode: str
    saliency: str
    compensation: str
    ratio: float  # requested fraction of block parameters
    achieved_ratio: float
    block_params_before: int
    block_params_after: int
    params_before: int
    params_after: int
    config_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    units: list[UnitRecord] = field(default_factory=list)
    removed_blocks: list[int] = field(default_factory=list)
    block_scores: list[float] = field(default_factory=list)  # blocks mode: the metric per block (or start)
    added_biases: list[str] = field(default_factory=list)
    #: original index of each block of the shrunk model (the teacher layer of each student layer in recovery)
    kept_blocks: list[int] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """One paragraph (what `D2Pruner` logs after a run)."""
        return self.describe()

    def mean_error(self) -> Optional[float]:
        values = [u.error for u in self.units if u.error is not None]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["config_changes"] = {k: list(v) for k, v in self.config_changes.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShrinkReport":
        """The report `to_dict` wrote (e.g. read back from `structured_shrink.json`)."""
        values = dict(data)
        values["units"] = [UnitRecord(**u) for u in values.get("units", [])]
        values["config_changes"] = {k: tuple(v) for k, v in values.get("config_changes", {}).items()}
        return cls(**values)

    def describe(self) -> str:
        """One paragraph on what was removed (for logs and the model card)."""
        what = {
            "channels": "MLP channels",
            "heads": "attention heads (whole key/value groups with their query heads)",
            "experts": "routed experts",
            "blocks": "whole blocks",
        }[self.mode]
        changes = ", ".join(f"`{k}` {_short(old)} → {_short(new)}" for k, (old, new) in self.config_changes.items())
        parts = [f"Removed {what}: {self.achieved_ratio:.2%} of the block parameters (requested {self.ratio:.2%}), "
                 f"{self.params_before:,} → {self.params_after:,} parameters in all, chosen by `{self.saliency}`"
                 f"{'' if self.compensation == 'none' else f' with `{self.compensation}` compensation'}."]
        if self.removed_blocks:
            parts.append(f"Blocks removed (original indices): {self.removed_blocks}.")
        if self.units:
            counts = {len(u.removed) for u in self.units}
            parts.append(f"{counts.pop() if len(counts) == 1 else counts} of {self.units[0].units} units removed in "
                         f"each of {len(self.units)} blocks.")
        if changes:
            parts.append(f"Config: {changes}.")
        if self.added_biases:
            parts.append(f"Zero-initialised biases added to {len(self.added_biases)} layers (bias compensation).")
        return " ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
