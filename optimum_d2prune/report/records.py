"""What a pruning run did: per-layer and per-block records, and their tables."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class LayerRecord:
    """One pruned matrix (or row block of a fused matrix)."""

    block: int
    name: str
    solver: str
    updated: bool
    shape: tuple[int, int]
    sparsity: float  # achieved fraction of zeros
    error: float  # relative reconstruction error on the calibration data
    flipped: Optional[int] = None  # mask entries changed by the dual-Taylor terms
    seconds: float = 0.0


@dataclass
class AttentionRecord:
    """The attention-aware choice of one block: which projection was left without weight update, and why."""

    block: int
    chosen: str
    strategy: str  # "layer", "global", or "fixed"
    errors: dict[str, float] = field(default_factory=dict)  # candidate -> summed q/k/v relative error
    kls: dict[str, float] = field(default_factory=dict)  # candidate -> KL(pruned ‖ dense) of attention
    objectives: dict[str, float] = field(default_factory=dict)
    attention: Optional[int] = None  # which attention module of the block, when it holds several (Swin stages)


@dataclass
class ExpertRecord:
    """One routed expert of a mixture-of-experts block: the calibration tokens the router sent to it, and the
    solver its matrices got (`fallback`: too few tokens for the configured one)."""

    block: int
    module: str
    expert: int
    tokens: Optional[int]  # None when the run collected no statistics (magnitude)
    solver: str
    fallback: bool = False


@dataclass
class ReconstructionRecord:
    """One output projection refit against the dense block (`reconstruction`): relative errors
    `‖W_d X_d − W X_p‖² / ‖W_d X_d‖²` of its output before and after the refit."""

    block: int
    name: str
    error_before: float
    error_after: float
    #: `reconstruction_options.reference="model"` asked for the dense model's output, but the block is not "residual stream
    #: plus this projection" (post-norm): refit to the dense block's output instead
    reference_fallback: bool = False


@dataclass
class PruneReport:
    """Everything a run measured. Printing it gives the per-layer table followed by the attention choices."""

    method: str
    pattern: str
    layers: list[LayerRecord] = field(default_factory=list)
    attention: list[AttentionRecord] = field(default_factory=list)
    experts: list[ExpertRecord] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    memory_increase_bytes: int = 0  # peak minus the memory in use when the run started
    #: the same increase per phase (inputs, statistics, attention choice, solve, propagate)
    phase_memory_bytes: dict[str, int] = field(default_factory=dict)
    global_search: dict[str, float] = field(default_factory=dict)  # candidate -> held-out score (global strategy)
    global_metric: str = ""  # what `global_search` holds: "PPL" (language models) or "logit KL" (vision)
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why it was left unpruned (non-finite values)
    block_sparsity: list[float] = field(default_factory=list)  # per-block budget of a non-uniform allocation
    reconstruction: list[ReconstructionRecord] = field(default_factory=list)  # block-level refits

    @property
    def total_sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0

    @property
    def flipped_fraction(self) -> Optional[float]:
        """Fraction of all mask entries whose choice the dual-Taylor terms changed (None if not measured)."""
        measured = [r for r in self.layers if r.flipped is not None]
        if not measured:
            return None
        return sum(r.flipped for r in measured) / sum(r.shape[0] * r.shape[1] for r in measured)

    def unupdated_counts(self) -> dict[str, int]:
        """How many blocks left each projection without weight update (the attention records' choices)."""
        counts: dict[str, int] = {}
        for a in self.attention:
            counts[a.chosen] = counts.get(a.chosen, 0) + 1
        return dict(sorted(counts.items()))

    def _weighted_sparsity(self, key) -> dict:
        """Achieved sparsity over the layers grouped by `key(record)`, each weighted by its number of weights."""
        sums: dict = {}
        for r in self.layers:
            entry = sums.setdefault(key(r), [0.0, 0.0])
            entry[0] += r.sparsity * r.shape[0] * r.shape[1]
            entry[1] += r.shape[0] * r.shape[1]
        return {k: v[0] / v[1] for k, v in sums.items()}

    def sparsity_by_module(self) -> dict[str, float]:
        """Achieved sparsity per full module name (row blocks of a fused matrix merged)."""
        return self._weighted_sparsity(lambda r: r.name.split("[")[0])

    def sparsity_by_block(self) -> dict[int, float]:
        """Achieved sparsity per block (over its targeted weights)."""
        return dict(sorted(self._weighted_sparsity(lambda r: r.block).items()))

    def block_table(self) -> str:
        """Per-block budget and achieved sparsity, with the block-level refit errors (empty when neither applies)."""
        if not self.block_sparsity and not self.reconstruction:
            return ""
        achieved = self.sparsity_by_block()
        refits: dict[int, list[ReconstructionRecord]] = {}
        for r in self.reconstruction:
            refits.setdefault(r.block, []).append(r)
        lines = ["| block | budget | sparsity | block-level refit: output error before -> after |",
                 "|---:|---:|---:|---|"]
        for block in sorted(set(achieved) | set(refits) | set(range(len(self.block_sparsity)))):
            budget = f"{self.block_sparsity[block]:.2%}" if block < len(self.block_sparsity) else ""
            done = f"{achieved[block]:.2%}" if block in achieved else ""
            refit = "; ".join(f"{r.name.rsplit('.', 1)[-1]} {_fmt(r.error_before)} -> {_fmt(r.error_after)}"
                              for r in refits.get(block, []))
            lines.append(f"| {block} | {budget} | {done} | {refit} |")
        return "\n".join(lines)

    def layer_table(self) -> str:
        lines = [
            "| block | layer | solver | update | sparsity | rel. error | dual-Taylor flips |",
            "|---:|---|---|:---:|---:|---:|---:|",
        ]
        for r in self.layers:
            flips = "" if r.flipped is None else f"{r.flipped / (r.shape[0] * r.shape[1]):.2%}"
            lines.append(
                f"| {r.block} | {r.name} | {r.solver} | {'yes' if r.updated else 'no'} | {r.sparsity:.2%} "
                f"| {_fmt(r.error)} | {flips} |"
            )
        return "\n".join(lines)

    def attention_table(self) -> str:
        if not self.attention:
            return ""
        lines = [
            "| block | left un-updated | strategy | objective q / k / v | error q / k / v | KL q / k / v |",
            "|---:|:---:|---|---|---|---|",
        ]
        for a in self.attention:
            block = a.block if a.attention is None else f"{a.block}.{a.attention}"
            lines.append(
                f"| {block} | {a.chosen} | {a.strategy} | {_triple(a.objectives)} | {_triple(a.errors)} "
                f"| {_triple(a.kls)} |"
            )
        return "\n".join(lines)

    def expert_table(self) -> str:
        if not self.experts:
            return ""
        lines = ["| block | experts module | expert | routed tokens | solver |", "|---:|---|---:|---:|---|"]
        for e in self.experts:
            note = " (fallback)" if e.fallback else ""
            lines.append(f"| {e.block} | {e.module} | {e.expert} | {e.tokens if e.tokens is not None else 'n/a'} "
                         f"| {e.solver}{note} |")
        return "\n".join(lines)

    def summary(self) -> str:
        flips = self.flipped_fraction
        increase = self.memory_increase_bytes / 2**20
        memory = f"peak_memory={self.peak_memory_bytes / 2**20:.0f} MiB ({self.peak_memory_kind}" + (
            f", +{increase:.0f} MiB during the run)" if increase >= 1 else ")")
        parts = [f"method={self.method} pattern={self.pattern} layers={len(self.layers)} "
                 f"sparsity={self.total_sparsity:.2%} time={self.seconds:.1f}s {memory}"]
        if flips is not None:
            parts.append(f"dual-Taylor terms changed {flips:.3%} of the mask entries (where measured: "
                         "`measure_flips`)")
        if self.attention:
            parts.append("un-updated projection per block: " + ", ".join(
                f"{p}={n}" for p, n in self.unupdated_counts().items()))
        if self.block_sparsity:
            parts.append(f"non-uniform budgets: block sparsity {min(self.block_sparsity):.2%} to "
                         f"{max(self.block_sparsity):.2%}")
        if self.reconstruction:
            before = sum(r.error_before for r in self.reconstruction) / len(self.reconstruction)
            after = sum(r.error_after for r in self.reconstruction) / len(self.reconstruction)
            parts.append(f"block-level refit of {len(self.reconstruction)} output projections: mean relative output "
                         f"error {before:.4g} -> {after:.4g}")
        if self.skipped:
            parts.append(f"{len(self.skipped)} module(s) left unpruned (NaN/Inf): " + ", ".join(self.skipped))
        if self.experts:
            fallback = [f"{e.module}[{e.expert}] ({e.tokens} tokens, {e.solver})" for e in self.experts if e.fallback]
            parts.append(f"experts: {len(self.experts)} routed experts, {len(fallback)} with too few calibration "
                         "tokens" + (": " + ", ".join(fallback) if fallback else ""))
        if self.global_search:
            scores = ", ".join(f"{k}={v:.4g}" for k, v in self.global_search.items())
            parts.append(f"global search, held-out {self.global_metric} per candidate (un-updated projection): {scores}")
        return "\n".join(parts)

    def __str__(self) -> str:
        sections = [self.summary(), self.block_table(), self.layer_table(), self.attention_table(),
                    self.expert_table()]
        return "\n\n".join(s for s in sections if s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _triple(values: dict[str, float]) -> str:
    return " / ".join(_fmt(values[p]) if p in values else "-" for p in ("q", "k", "v"))
