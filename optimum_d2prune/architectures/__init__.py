"""Architecture adapters. Every module of this package is imported so that its `@register_adapter` runs:
adding an architecture is one new file here."""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from .base import (
    MODEL_TYPE_TO_ADAPTER,
    PROJECTIONS,
    PRUNABLE_TYPES,
    ArchitectureAdapter,
    AttentionInputs,
    AttentionScores,
    ProjectionRef,
    register_adapter,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "generic", "support_table"):
        importlib.import_module(f"{__name__}.{_module.name}")

from .generic import GenericAdapter, UnsupportedArchitectureError  # noqa: E402

__all__ = [
    "MODEL_TYPE_TO_ADAPTER",
    "PROJECTIONS",
    "PRUNABLE_TYPES",
    "ArchitectureAdapter",
    "AttentionInputs",
    "AttentionScores",
    "GenericAdapter",
    "UnsupportedArchitectureError",
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


def get_adapter(model: nn.Module, generic: bool = False) -> ArchitectureAdapter:
    """The adapter for `model`: the hand-written one of its family where there is one (faster attention
    probabilities), else the generic adapter (blocks and q/k/v found by name, the model's own attention).

    `generic=True` forces the generic path. Raises `UnsupportedArchitectureError` (a `ValueError`) that says what
    was missing and how to provide it.
    """
    adapter_cls = None if generic else MODEL_TYPE_TO_ADAPTER.get(model_type_of(model))
    adapter = adapter_cls() if adapter_cls is not None else GenericAdapter()
    adapter.validate(model)
    return adapter
