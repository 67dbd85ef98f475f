"""`d2prune_config.json`: the record of a pruning run, built from the weights being saved and read back strictly.

A record holds `format_version`, the run's config, the achieved sparsity of every pruned module, the per-block
attention choices, calibration and evaluation (with their sizes), the provenance of the weights, the versions
used, and a `run_id` naming the save that wrote it. Reading one never trusts it: a file that is not JSON, a
record with missing or ill-typed fields, an empty or non-numeric sparsity map, or a newer format is refused in one
line naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..configuration import CONFIG_NAME, D2PruneConfig
from ..errors import CheckpointError
from ..report import PruneReport

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# a module's zero fraction may differ from the record by this much (float round-off of a fraction, nothing more)
SPARSITY_TOLERANCE = 1e-6


def new_run_id() -> str:
    """A fresh id for one save (recorded in the record; `record_evaluation` checks it)."""
    return uuid.uuid4().hex


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced a checkpoint."""
    import huggingface_hub
    import transformers

    from .. import __version__

    return {"optimum_d2prune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "huggingface_hub": huggingface_hub.__version__}


def measure_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros of a tensor."""
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of `m` consecutive inputs (per output row) with fewer than `n` zeros."""
    weight = weight.reshape(-1, weight.shape[-1])  # fused experts [E, out, in]: every expert's rows
    rows, cols = weight.shape
    if cols % m:
        return rows * (cols // m + 1)
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(-1)
    return int((zeros < n).sum())


def module_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The pruned matrix `[out, in]` of a module (GPT-2's Conv1D stores it transposed), or `[E, out, in]` for a
    fused MoE experts parameter (`...experts.gate_up_proj`). Raises `KeyError` when there is none."""
    from ..architectures.base import matrix

    try:
        module = model.get_submodule(name)
    except AttributeError:
        parent_name, _, param = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            raise KeyError(name) from None
        value = getattr(parent, param, None)
        if not isinstance(value, torch.Tensor) or value.dim() != 3:
            raise KeyError(name) from None
        return (value.transpose(1, 2) if getattr(parent, "is_transposed", False) else value).detach()
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise KeyError(name)
    return matrix(module).detach()


def _planned_modules(model: nn.Module, config: D2PruneConfig) -> list[str]:
    from ..architectures import get_adapter
    from ..pipeline.engine import PruningEngine

    plan = PruningEngine(config, get_adapter(model)).plan(model)
    return list(dict.fromkeys(t.record_name for t in plan.targets()))


def build_record(model: nn.Module, config: D2PruneConfig, report: Optional[PruneReport] = None,
                 **fields_: Any) -> dict[str, Any]:
    """The content of `d2prune_config.json` for `model` as it is now (sparsity measured on its weights).

    `fields_` are stored as given: `calibration`, `evaluation`, `evaluation_sizes`, `command`, `base_model`,
    `license`, `source` (the provenance of the weights), `run_id`.
    """
    if report is not None and report.layers:
        modules = list(report.sparsity_by_module())
    else:  # no report: the matrices the config targets in this model
        modules = _planned_modules(model, config)
    sparsity, total, zeros = {}, 0, 0.0
    for name in modules:
        weight = module_weight(model, name)
        sparsity[name] = measure_sparsity(weight)
        total += weight.numel()
        zeros += sparsity[name] * weight.numel()
    if report is not None:
        for name, recorded in report.sparsity_by_module().items():
            if abs(recorded - sparsity[name]) > SPARSITY_TOLERANCE:
                logger.warning("%s: sparsity %.6f now, %.6f right after pruning: the weights were changed since.",
                               name, sparsity[name], recorded)
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "run_id": fields_.pop("run_id", None) or new_run_id(),
        "config": config.to_dict(),
        "mask_structure": config.mask_structure,
        "sparsity": sparsity,
        "total_sparsity": zeros / total if total else 0.0,
        "attention": [{"block": a.block, "chosen": a.chosen, "strategy": a.strategy}
                      for a in (report.attention if report else [])],
        "calibration": fields_.pop("calibration", None) or {},
        "evaluation": fields_.pop("evaluation", None) or {},
        "evaluation_sizes": fields_.pop("evaluation_sizes", None) or {},
        "versions": library_versions(),
    }
    record.update(fields_)
    if report is not None:
        record["report"] = {"seconds": report.seconds, "global_search": report.global_search,
                            "global_metric": report.global_metric,
                            "errors": {r.name: r.error for r in report.layers}}
    return record


# ------------------------------------------------------------------------------------------------- reading
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _refusal(file: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{file} is not a usable optimum-d2prune record: {why}. Save the model again with "
                           "`D2Pruner.save` / `optimum-cli d2prune`, or load it with transformers alone.")


def parse_record(text: str, file: Any) -> dict[str, Any]:
    """The record in `text` (the content of `file`), validated; raises `CheckpointError` naming `file`."""
    try:
        record = json.loads(text)
    except ValueError as err:
        raise _refusal(file, f"it is not JSON ({err})") from None
    return validate_record(record, file)


def validate_record(record: Any, file: Any = CONFIG_NAME) -> dict[str, Any]:
    """`record` if it is a usable record; else `CheckpointError` naming `file` and what is wrong."""
    if not isinstance(record, dict):
        raise _refusal(file, f"it holds a JSON {type(record).__name__}, not an object")
    missing = [k for k in ("format_version", "config", "sparsity") if k not in record]
    if missing:
        raise _refusal(file, f"the key(s) {missing} are missing")
    version = record["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _refusal(file, f"`format_version` must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{file} was written by a newer optimum-d2prune: upgrade (`pip install -U "
                              f"optimum-d2prune`); its record format is {version}, this version reads up to "
                              f"{FORMAT_VERSION}.")
    if not isinstance(record["config"], dict):
        raise _refusal(file, "`config` is not an object")
    sparsity = record["sparsity"]
    if not isinstance(sparsity, dict) or not sparsity:
        raise _refusal(file, "its `sparsity` map is empty or not an object: it records no pruned module")
    bad = [name for name, value in sparsity.items() if not (_number(value) and 0 <= value <= 1)]
    if bad:
        raise _refusal(file, f"the recorded sparsity of {len(bad)} module(s) is not a number in [0, 1] (e.g. "
                             f"{bad[0]}: {sparsity[bad[0]]!r})")
    for key in ("mask_structure", "base_model", "command", "run_id", "license"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise _refusal(file, f"`{key}` is not a string")
    for key in ("calibration", "evaluation", "evaluation_sizes", "source"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            raise _refusal(file, f"`{key}` is not an object")
    if not isinstance(record.get("attention", []), list):
        raise _refusal(file, "`attention` is not a list")
    return record


def read_record_file(file: Path) -> dict[str, Any]:
    """Read and validate the record at `file` (one-line `CheckpointError` for anything unusable)."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{file} is not a usable optimum-d2prune record: it is not UTF-8 text.") from None
    return parse_record(text, file)


def _registered_methods() -> set[str]:
    from ..methods.registry import registered_methods

    return set(registered_methods())


def config_from_record(record: dict[str, Any], file: Any = CONFIG_NAME) -> Optional[D2PruneConfig]:
    """The `D2PruneConfig` of a record, or None (with a warning) when its method is not registered in this process.

    Fields this version does not know are dropped with a warning naming them (a record from a newer release; the
    flat records of earlier releases are converted: `D2PruneConfig.from_dict`). A value this version refuses
    raises `CheckpointError` naming the file.
    """
    data = dict(record["config"])
    method = data.get("method", "d2prune")
    if method not in _registered_methods():
        logger.warning("%s: the model was pruned with the method %r, which is not registered in this process "
                       "(import the code that registers it to get its config); loading it as a plain model.", file,
                       method)
        return None
    try:
        return D2PruneConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{file}: its config is refused by this version of optimum-d2prune ({err}).") from None


def pattern_of(record: dict[str, Any], file: Any = CONFIG_NAME):
    """The sparsity pattern a record claims (its `mask_structure`; only N:M adds a check beyond the fractions)."""
    from ..patterns import SparsityPattern

    structure = record.get("mask_structure") or record["config"].get("mask_structure") or "unstructured"
    try:
        return SparsityPattern.parse(structure, 0.0)
    except ValueError:
        raise CheckpointError(f"{file}: `mask_structure` {structure!r} is not a sparsity pattern.") from None
