"""Architecture adapters. Every module of this package is imported so that its `@register_adapter` runs:
adding an architecture is one new file here."""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from .base import (
    MODEL_TYPE_TO_ADAPTER,
    PROJECTIONS,
    ArchitectureAdapter,
    AttentionInputs,
    ProjectionRef,
    register_adapter,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "MODEL_TYPE_TO_ADAPTER",
    "PROJECTIONS",
    "ArchitectureAdapter",
    "AttentionInputs",
    "ProjectionRef",
    "get_adapter",
    "model_type_of",
    "register_adapter",
]


def model_type_of(model: nn.Module) -> str:
    """The registry key of a model: transformers' `config.model_type`, or what an adapter's `detect` recognises."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str):
        return model_type
    for key, adapter in MODEL_TYPE_TO_ADAPTER.items():
        detect = getattr(adapter, "detect", None)
        if detect is not None and detect(model):
            return key
    return type(model).__name__


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for `model`, or a `ValueError` that says how to add one."""
    model_type = model_type_of(model)
    adapter_cls = MODEL_TYPE_TO_ADAPTER.get(model_type)
    if adapter_cls is None:
        raise ValueError(
            f"Architecture {model_type!r} is not supported (supported: {sorted(MODEL_TYPE_TO_ADAPTER)}). To add it, "
            "create one file in optimum_d2prune/architectures/ with a class decorated by "
            f"`@register_adapter({model_type!r})` that sets `block_paths` and the q/k/v names and implements "
            "`attention_probs` (see architectures/llama.py)."
        )
    adapter = adapter_cls()
    adapter.validate(model)
    return adapter
