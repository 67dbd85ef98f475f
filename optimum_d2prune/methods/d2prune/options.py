"""D²Prune's knobs: the dual-Taylor terms, which q/k/v projection skips the weight update, and the KL term of that
choice. No torch here (the command line builds its flags from these fields)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar, Optional, Union

from ...errors import ConfigError
from ...patterns import SparsityPattern
from ...validation import as_bool, as_choice, as_float, as_int
from ..options import ObsOptions

#: what `skip_update` may say: a fixed projection, "dynamic" (chosen per block), "none" (q, k and v all updated),
#: "qkv" (none of them updated), or "auto" ("dynamic" for unstructured sparsity, "none" for N:M)
SKIP_UPDATE = ("auto", "dynamic", "q", "k", "v", "none", "qkv")
STRATEGIES = ("auto", "layer", "global")
#: calibration length at which the dual-Taylor scale was tuned; `activation_scale="auto"` keeps the strength of the
#: λ1 term relative to per-token magnitudes what `s = L` gives at this length, for any calibration length L
REFERENCE_SEQ_LEN = 512


@dataclass
class D2PruneOptions(ObsOptions):
    """D²Prune: dual-Taylor saliency in the OBS sweep, and one of q/k/v pruned without weight update."""

    group_name: ClassVar[str] = "`method_options` of d2prune"

    refit_steps: int = field(
        default=8,
        metadata={"help": "Conjugate-gradient steps of the least-squares refit of the surviving weights after the OBS "
                          "sweep (weight-updated matrices only; capped per matrix by `refit_budget`)."},
    )
    lambda1: float = field(default=1.0, metadata={"help": "Weight λ1 of the first-order dual-Taylor term."})
    lambda2: float = field(default=0.0, metadata={"help": "Weight λ2 of the second-order activation term."})
    activation_scale: Union[float, str] = field(
        default="auto",
        metadata={"help": 'Scale s dividing activation norms in the dual-Taylor terms; "auto" = sqrt(512 * L) for '
                          "calibration length L (the term's strength then does not depend on L; s = L at L = 512)."},
    )
    skip_update: str = field(
        default="auto",
        metadata={"help": 'The attention projection pruned without weight update: "q", "k" or "v"; "dynamic": chosen '
                          'per block by reconstruction error + kl_weight * KL; "none": q, k and v all updated; "qkv": '
                          'none of them updated; "auto": "dynamic" for unstructured sparsity, "none" for N:M (chosen '
                          "on the dev split: at 2:4 the projection left un-updated costs 3-5 % perplexity).",
                  "choices": SKIP_UPDATE},
    )
    strategy: str = field(
        default="auto",
        metadata={"help": 'How the dynamic choice is made: "layer": per block, one prune; "global": one prune per '
                          "candidate (q, k or v left un-updated in every block, or all updated), the best on held-out "
                          'calibration data kept (about 5x the time); "auto": "layer" for language models, "global" '
                          "for image classifiers.", "choices": STRATEGIES},
    )
    kl_weight: float = field(default=10.0, metadata={"help": "ρ: weight of the attention KL term in the choice."})
    kl_samples: int = field(
        default=4, metadata={"help": "Calibration sequences whose attention probabilities give the KL term."})
    kl_query_rows: Optional[int] = field(
        default=64,
        metadata={"help": "The KL term (a mean over attention rows) is estimated on this many evenly spaced query "
                          "positions per sequence, so its cost grows as T rather than T²; None: every position."},
    )
    measure_flips: bool = field(
        default=False,
        metadata={"help": "Count the mask entries the dual-Taylor terms change (the report's 'dual-Taylor flips'): a "
                          "second mask selection per segment, 1-3 % of the pruning time."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lambda1 = as_float("lambda1", self.lambda1)
        self.lambda2 = as_float("lambda2", self.lambda2)
        if self.activation_scale != "auto":
            if isinstance(self.activation_scale, str):
                raise ConfigError(f'`activation_scale` must be a positive number or "auto", got '
                                  f"{self.activation_scale!r}.")
            self.activation_scale = as_float("activation_scale", self.activation_scale, 0.0, low_open=True)
        self.skip_update = as_choice("skip_update", self.skip_update, SKIP_UPDATE)
        self.strategy = as_choice("strategy", self.strategy, STRATEGIES)
        self.kl_weight = as_float("kl_weight", self.kl_weight, 0.0)
        self.kl_samples = as_int("kl_samples", self.kl_samples, 1)
        if self.kl_query_rows is not None:
            self.kl_query_rows = as_int("kl_query_rows", self.kl_query_rows, 1)
        self.measure_flips = as_bool("measure_flips", self.measure_flips)

    def resolved(self, pattern: SparsityPattern) -> "D2PruneOptions":
        options = super().resolved(pattern)
        if options.skip_update == "auto":
            return replace(options, skip_update="none" if pattern.is_nm else "dynamic")
        return options

    @property
    def attention_aware(self) -> bool:
        """Whether a q/k/v projection is treated apart from the other targets (needs the blocks' q/k/v)."""
        return self.skip_update != "none"

    def scale(self, seq_len: int) -> float:
        """The numeric scale s; `"auto"` is `sqrt(REFERENCE_SEQ_LEN * seq_len)`: with RMS statistics the λ1 term is
        `|w|·x_rms·y_rms·L/s²`, so the auto scale makes it `|w|·x_rms·y_rms/512` whatever the calibration length (ViTs
        calibrate on ~200 tokens per image)."""
        if self.activation_scale == "auto":
            return math.sqrt(REFERENCE_SEQ_LEN * seq_len)
        return float(self.activation_scale)
