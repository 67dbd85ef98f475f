"""Architecture adapters: where a model's block stacks, attention modules and q/k/v are.

Every transformers model goes through `GenericAdapter` (blocks and q/k/v found by name and structure, attention
probabilities from the model's own attention code). A library whose attention gives no other way in gets a
hand-written adapter registered with `@register_adapter` (timm's `VisionTransformer`, `timm.py`).
"""

from __future__ import annotations

from torch import nn

from . import timm  # noqa: E402,F401  (registers the timm ViT adapter)
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


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for `model`: a registered one for its family (`register_adapter`), else the generic adapter.
    Raises `UnsupportedArchitectureError` that says what was missing and how to provide it."""
    adapter_cls = MODEL_TYPE_TO_ADAPTER.get(model_type_of(model))
    adapter = adapter_cls() if adapter_cls is not None else GenericAdapter()
    adapter.validate(model)
    return adapter
