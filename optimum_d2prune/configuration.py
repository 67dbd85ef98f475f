"""`D2PruneConfig`: what a pruning run does, validated before any work starts; presets as complete tables.

A user sets the sparsity (or an N:M pattern), the method, a preset, the allocation rule, block reconstruction on or
off, and which layers to prune. Everything else belongs to an option group owned by what it configures: the
method's (`method_options`: `D2PruneOptions`, `ObsOptions`, ...), the allocation rule's (`allocation_options`), the
reconstruction's (`reconstruction_options`); where and how the run executes (`runtime`) is never serialised.

Resolution: the preset's table gives the values the user did not give (an option dict is applied key by key over
the preset's), then every value that depends on the sparsity pattern is made concrete. The resolved config is what
`to_dict` records, so `from_dict(config.to_dict()) == config`. No torch at import time (the command line builds its
flags from these fields).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Optional, Union

from .errors import ConfigError
from .methods.d2prune.options import D2PruneOptions
from .methods.options import MethodOptions, ObsOptions
from .patterns import SparsityPattern
from .refine.options import ALLOCATION_OPTIONS, ReconstructionOptions
from .validation import OptionGroup, as_bool, as_choice, as_int, as_regex_list

logger = logging.getLogger(__name__)

CONFIG_NAME = "d2prune_config.json"
NONFINITE_ACTIONS = ("raise", "skip")
PRODUCER = "optimum-d2prune"


@dataclass
class RuntimeOptions(OptionGroup):
    """Where and how a run executes. None of it changes the pruned weights, and none of it is serialised."""

    group_name: ClassVar[str] = "`runtime`"

    device: Optional[str] = field(
        default=None, metadata={"help": 'Where blocks are processed (e.g. "cuda:0"); default: where each block lives.'})
    checkpoint_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Save each pruned block and the propagated activations here; a restarted run resumes."})
    offload_activations: bool = field(
        default=False,
        metadata={"help": "Keep the calibration activations between blocks on the CPU (pinned) and stream them to the "
                          "device one batch at a time: device memory then holds one batch, not all of them."})
    kl_chunk_mib: int = field(
        default=64,
        metadata={"help": "Memory bound of D²Prune's KL term: attention probabilities are computed for as many heads "
                          "at a time as fit one [heads, T, T] fp32 tensor of this many MiB."})
    on_nonfinite: str = field(
        default="raise",
        metadata={"help": 'NaN/Inf in a targeted weight or its calibration statistics: "raise" (naming the block and '
                          'module) or "skip" (leave that module dense and list it in the report).',
                  "choices": NONFINITE_ACTIONS})
    weights_from_rank0: bool = field(
        default=False,
        metadata={"help": "Data-parallel runs (torchrun): only rank 0 holds the model's weights; every other rank "
                          "holds the model on the meta device and receives each block from rank 0 when it is "
                          "pruned, then drops it, so host memory does not grow with the number of ranks. Set it on "
                          "every rank; only rank 0's model is complete afterwards."})

    def __post_init__(self) -> None:
        if self.device is not None:
            self.device = _parse_device(self.device)
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)):
                raise ConfigError(f"`checkpoint_dir` must be a path, got {self.checkpoint_dir!r}.")
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)
        self.offload_activations = as_bool("offload_activations", self.offload_activations)
        self.kl_chunk_mib = as_int("kl_chunk_mib", self.kl_chunk_mib, 1)
        self.on_nonfinite = as_choice("on_nonfinite", self.on_nonfinite, NONFINITE_ACTIONS)
        self.weights_from_rank0 = as_bool("weights_from_rank0", self.weights_from_rank0)


def _parse_device(value: Any) -> str:
    """A device string torch understands ("cpu", "cuda", "cuda:1", ...), normalised; availability is checked when
    the run starts (`pipeline.checks.check_device`)."""
    import torch

    try:
        return str(torch.device(value))
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f'`device` must be a torch device such as "cpu", "cuda" or "cuda:1", got {value!r}.') from None


@dataclass(frozen=True)
class Preset:
    """A named, complete set of defaults: what the preset gives every field it manages, for every built-in method.
    Explicit values always win (an option dict key by key)."""

    description: str
    allocation: str = "uniform"
    allocation_options: dict[str, Any] = field(default_factory=dict)
    reconstruction: bool = False
    reconstruction_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method name -> its options


#: The presets. "paper": the published algorithm (s = 1500, λ1 = 1, λ2 = 0, v left un-updated, no refit).
#: "max_quality": the best combination measured on SmolLM2's dev split (docs/decisions.md): OWL budgets from 75 %
#: sparsity, block reconstruction of the output projections, the refit without early stop, 12 ADMM steps.
PRESETS: dict[str, Preset] = {
    "paper": Preset(
        description="the published D²Prune: s = 1500, λ1 = 1, λ2 = 0, v pruned without update, no refit",
        method_options={
            "d2prune": {"activation_scale": 1500.0, "lambda1": 1.0, "lambda2": 0.0, "skip_update": "v",
                        "refit_steps": 0, "refit_tolerance": 0.0},
            "sparsegpt": {"refit_steps": 0, "refit_tolerance": 0.0},
        },
    ),
    "max_quality": Preset(
        description="OWL budgets from 75 % sparsity, block reconstruction, 12 ADMM steps (about 2-3x the time)",
        allocation="owl",
        allocation_options={"min_sparsity": 0.75},
        reconstruction=True,
        reconstruction_options={"refit_tolerance": 0.0},
        method_options={
            "d2prune": {"refit_tolerance": 0.0, "admm_steps": 12},
            "sparsegpt": {"refit_tolerance": 0.0, "admm_steps": 12},
        },
    ),
}


def method_options_class(method: str) -> type[MethodOptions]:
    """The options dataclass of a registered method (imports the method registry)."""
    from .methods.registry import get_method

    return get_method(method).options_class


@dataclass
class D2PruneConfig:
    """Configuration of a D²Prune (or baseline) pruning run.

    Follows the shape of Optimum's quantization configs: a validated dataclass with `to_dict`/`from_dict` and JSON
    round-trips. Every value is checked in `__post_init__`, so a bad value fails before the model is touched.

    Example:
    ```python
    >>> from optimum_d2prune import D2PruneConfig
    >>> config = D2PruneConfig(sparsity=0.5)                        # unstructured 50 %
    >>> config = D2PruneConfig(mask_structure="2:4")                 # semi-structured 2:4
    >>> config = D2PruneConfig(sparsity=0.5, method="sparsegpt")     # the SparseGPT baseline, same engine
    >>> config = D2PruneConfig(sparsity=0.7, preset="max_quality")   # slower, best quality at high sparsity
    >>> config = D2PruneConfig(sparsity=0.5, method_options={"kl_weight": 3.0})
    ```
    """

    sparsity: float = field(
        default=0.5,
        metadata={"help": "Fraction of zeros in every targeted matrix (unstructured); for N:M it is N/M."})
    mask_structure: str = field(
        default="unstructured", metadata={"help": '"unstructured" or "N:M" (e.g. "2:4", "4:8"): N zeros in every M.'})
    method: str = field(
        default="d2prune",
        metadata={"help": "The pruning method: d2prune, sparsegpt, wanda, magnitude, shrink (structured: removes "
                          "channels, heads, experts or blocks; see docs/structured.md), or any registered with "
                          "`optimum_d2prune.methods.register_method`."})
    preset: Optional[str] = field(
        default=None,
        metadata={"help": 'Defaults for what is not given: "paper" (the published D²Prune) or "max_quality" (OWL '
                          "budgets from 75 % sparsity, block reconstruction, 12 ADMM steps); none: the library's.",
                  "choices": tuple(PRESETS)})
    allocation: Optional[str] = field(
        default=None,
        metadata={"help": 'How the sparsity is shared between blocks: "uniform" or "owl" (more weights kept in blocks '
                          "with more activation outliers; unstructured only). Default: the preset's, else uniform.",
                  "choices": tuple(ALLOCATION_OPTIONS)})
    reconstruction: Optional[bool] = field(
        default=None,
        metadata={"help": "After each block is pruned, refit its output projections against the dense block's "
                          "outputs. Default: the preset's, else off."})
    sequential: bool = field(
        default=False,
        metadata={"help": "Calibrate each group of linears (q/k/v, o, gate/up, down) on the outputs of the already "
                          "pruned groups before it in the block (more forward passes, lower error)."})
    targets: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Regexes of full module names to prune; default: every Linear in the blocks."})
    ignore: list[str] = field(default_factory=list, metadata={"help": "Regexes of module names to leave dense."})
    method_options: Any = field(
        default=None,
        metadata={"help": "The method's options (`D2PruneOptions`, `ObsOptions`, ...), or a dict of them applied over "
                          "the preset's."})
    allocation_options: Any = field(
        default=None, metadata={"help": "The allocation rule's options (`OwlOptions`), or a dict of them."})
    reconstruction_options: Any = field(
        default=None, metadata={"help": "The block reconstruction's options (`ReconstructionOptions`), or a dict."})
    runtime: RuntimeOptions = field(
        default_factory=RuntimeOptions, compare=False,
        metadata={"help": "Device, resume folder, activation offload, memory bounds (`RuntimeOptions`); not saved."})

    def __post_init__(self) -> None:
        from .methods.registry import registered_methods

        methods = registered_methods()
        if not isinstance(self.method, str) or self.method not in methods:
            raise ConfigError(f"`method` must be one of {tuple(methods)}, got {self.method!r}.")
        pattern = SparsityPattern.parse(self.mask_structure, self.sparsity)
        self.mask_structure = pattern.structure
        self.sparsity = pattern.sparsity
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"`preset` must be None or one of {tuple(PRESETS)}, got {self.preset!r}.")
        preset = PRESETS.get(self.preset)
        explicit_allocation = self.allocation is not None
        if explicit_allocation:
            self.allocation = as_choice("allocation", self.allocation, tuple(ALLOCATION_OPTIONS))
        else:  # an N:M pattern has the same sparsity in every block by definition
            self.allocation = preset.allocation if preset and not pattern.is_nm else "uniform"
        # the preset's options are those of its own rule (an N:M pattern falls back to uniform, which has none)
        preset_rule = preset is not None and not explicit_allocation and self.allocation == preset.allocation
        allocation_defaults = preset.allocation_options if preset_rule else {}
        self.allocation_options = ALLOCATION_OPTIONS[self.allocation].build(self.allocation_options,
                                                                            allocation_defaults)
        if explicit_allocation and self.allocation != "uniform" and pattern.is_nm:
            raise ConfigError(f"`allocation={self.allocation!r}` needs unstructured sparsity: an N:M pattern "
                              f"({pattern.structure}) has the same sparsity in every block by definition; use "
                              'allocation="uniform".')
        if self.reconstruction is None:
            self.reconstruction = preset.reconstruction if preset else False
        self.reconstruction = as_bool("reconstruction", self.reconstruction)
        options_class = method_options_class(self.method)
        method_defaults = preset.method_options.get(self.method, {}) if preset else {}
        self.method_options = options_class.build(self.method_options, method_defaults).resolved(pattern)
        if self.reconstruction:
            self.reconstruction_options = ReconstructionOptions.build(
                self.reconstruction_options, preset.reconstruction_options if preset else {},
            ).resolved(self.method_options.refit_settings())
        elif self.reconstruction_options is not None:
            raise ConfigError("`reconstruction_options` are given but `reconstruction` is off: set "
                              "`reconstruction=True` or drop them.")
        self.sequential = as_bool("sequential", self.sequential)
        if self.targets is not None:
            self.targets = as_regex_list("targets", self.targets)
            if not self.targets:
                raise ConfigError("`targets` is empty: pass None to prune every Linear of the blocks.")
        self.ignore = as_regex_list("ignore", self.ignore)
        if not isinstance(self.runtime, RuntimeOptions):
            self.runtime = RuntimeOptions.build(self.runtime)

    # ------------------------------------------------------------------ views
    @property
    def pattern(self) -> SparsityPattern:
        """The parsed sparsity pattern (unstructured fraction or N:M)."""
        return SparsityPattern.parse(self.mask_structure, self.sparsity)

    def replace(self, **changes: Any) -> "D2PruneConfig":
        """A validated copy with some fields changed. A new `preset` or `method` re-resolves what the preset and the
        method manage (allocation, reconstruction and option groups) unless given in the same call; `runtime` is
        kept unless given."""
        data = self.to_dict()
        data.pop("meta")
        if "preset" in changes:
            for name in ("allocation", "allocation_options", "reconstruction", "reconstruction_options",
                         "method_options"):
                data.pop(name)
        if "method" in changes:  # the method's options, and what the reconstruction borrowed from them
            data.pop("method_options", None)
            data.pop("reconstruction_options", None)
        if "allocation" in changes:
            data.pop("allocation_options", None)
        if changes.get("reconstruction") is False:
            data.pop("reconstruction_options", None)
        data.update(changes)
        data.setdefault("runtime", self.runtime)
        return D2PruneConfig(**data)

    # ------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON values, with the producer and its version; `runtime` is left out."""
        from . import __version__

        data: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "runtime":
                continue
            value = getattr(self, f.name)
            data[f.name] = value.to_dict() if isinstance(value, OptionGroup) else copy.deepcopy(value)
        data["meta"] = {"producer": PRODUCER, "version": __version__}
        return data

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "D2PruneConfig":
        """A config from `to_dict`'s output, from the flat format of earlier releases (converted), or from a newer
        release (unknown fields are dropped with a warning)."""
        if not isinstance(config_dict, dict):
            raise ConfigError(f"A D2PruneConfig dict is expected, got {type(config_dict).__name__}.")
        data = {k: v for k, v in config_dict.items() if k != "meta"}
        if any(key in LEGACY_FIELDS for key in data):
            data = _from_legacy(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            meta = config_dict.get("meta")
            version = meta.get("version", "an unknown version") if isinstance(meta, dict) else "an unknown version"
            logger.warning("Ignoring D2PruneConfig field(s) %s (written by optimum-d2prune %s; this one does not know "
                           "them).", unknown, version)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike]) -> "D2PruneConfig":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        # a saved checkpoint wraps the config together with the achieved sparsity and metadata
        return cls.from_dict(data["config"] if "config" in data and isinstance(data["config"], dict) else data)


# --------------------------------------------------------------------------------------- earlier flat format
#: flat field of earlier releases -> (group, name in the group); group "method", "allocation", "reconstruction",
#: "top" (a field of D2PruneConfig), "runtime" or "drop" (not part of a record)
LEGACY_FIELDS: dict[str, tuple[str, str]] = {
    "lambda1": ("method", "lambda1"), "lambda2": ("method", "lambda2"),
    "activation_scale": ("method", "activation_scale"), "block_size": ("method", "block_size"),
    "damp_percent": ("method", "damp_percent"), "refine_steps": ("method", "refit_steps"),
    "refine_tolerance": ("method", "refit_tolerance"), "admm_steps": ("method", "admm_steps"),
    "attention_update": ("method", "skip_update"), "dynamic_strategy": ("method", "strategy"),
    "kl_weight": ("method", "kl_weight"), "kl_num_samples": ("method", "kl_samples"),
    "kl_query_rows": ("method", "kl_query_rows"), "measure_flips": ("method", "measure_flips"),
    "min_expert_tokens": ("method", "min_expert_tokens"),
    "sparsity_allocation": ("top", "allocation"), "owl_lambda": ("allocation", "deviation"),
    "owl_m": ("allocation", "outlier_threshold"), "block_reconstruction": ("top", "reconstruction"),
    "reconstruction_targets": ("reconstruction", "targets"),
    "reconstruction_reference": ("reconstruction", "reference"),
    "device": ("runtime", "device"), "checkpoint_dir": ("runtime", "checkpoint_dir"),
    "offload_activations": ("runtime", "offload_activations"), "kl_chunk_mib": ("runtime", "kl_chunk_mib"),
    "on_nonfinite": ("runtime", "on_nonfinite"), "seed": ("drop", "seed"),
}
#: `attention_update` named what is updated ("all": every projection); `skip_update` names what is not
_SKIP_UPDATE = {"all": "none", "none": "qkv"}


def _from_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Convert the flat dict of earlier releases: method knobs into `method_options` (those the method does not
    have are dropped: earlier records stored every knob for every method), OWL's into `allocation_options`, the
    reconstruction's into `reconstruction_options`; runtime fields and the seed are not part of a config."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {"method": {}, "allocation": {}, "reconstruction": {}}
    for key, value in data.items():
        group, name = LEGACY_FIELDS.get(key, ("top", key))
        if value is None or group in ("drop", "runtime"):
            continue
        if key == "attention_update":
            value = _SKIP_UPDATE.get(value, value)
        if group == "top":
            out[name] = value
        else:
            groups[group][name] = value
    method = out.get("method", "d2prune")
    try:
        method_fields = {f.name for f in fields(method_options_class(method))}
    except ConfigError:
        method_fields = set()
    preset = PRESETS.get(out.get("preset"))
    rebuild = out.get("reconstruction", preset.reconstruction if preset else False)
    if groups["method"].get("refit_steps"):  # an explicit step count was used as given, uncapped (0: no refit)
        groups["method"]["refit_budget"] = False
    if rebuild:
        for name in ("refit_tolerance", "damp_percent"):  # the reconstruction borrowed them from the config
            if name in groups["method"] and name not in method_fields:
                groups["reconstruction"][name] = groups["method"][name]
    out["method_options"] = {k: v for k, v in groups["method"].items() if k in method_fields}
    allocation = out.get("allocation", preset.allocation if preset else "uniform")
    if allocation != "uniform" and groups["allocation"]:
        out["allocation_options"] = groups["allocation"]
    if rebuild and groups["reconstruction"]:
        out["reconstruction_options"] = groups["reconstruction"]
    return out


__all__ = ["CONFIG_NAME", "D2PruneConfig", "D2PruneOptions", "MethodOptions", "ObsOptions", "PRESETS",
           "ReconstructionOptions", "RuntimeOptions"]
