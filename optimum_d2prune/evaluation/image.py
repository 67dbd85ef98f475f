"""Image-classification accuracy (top-1, top-5) for transformers and timm models."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.hooks import calibration_context

logger = logging.getLogger(__name__)


def class_logits(output: Any) -> Optional[torch.Tensor]:
    """Class logits of a transformers output (`.logits`) or of a timm model's tensor output; None without them."""
    return output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)


@dataclass
class ImageAccuracy:
    """Top-1 (and top-5 when the model has at least 5 classes) accuracy in [0, 1] over `num_images` images."""

    top1: float
    top5: Optional[float]
    num_images: int


def _split_batch(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        images = batch.get("pixel_values")
        labels = batch.get("labels", batch.get("label"))
    elif isinstance(batch, (list, tuple)) and len(batch) == 2:
        images, labels = batch
    else:
        images = labels = None
    if images is None or labels is None:
        raise ValueError(
            f"Evaluation batch {index} must be `(images, labels)` or a dict with `pixel_values` and `labels`, got "
            f"{type(batch).__name__}."
        )
    return torch.as_tensor(images), torch.as_tensor(labels)


def image_accuracy(model: nn.Module, loader: Iterable[Any], max_batches: Optional[int] = None) -> ImageAccuracy:
    """Top-1 / top-5 accuracy of an image classifier.

    Args:
        model: a transformers image classifier (outputs `.logits`) or a timm model (outputs a tensor).
        loader: batches of `(images [B, 3, H, W], labels [B])` (e.g. a torchvision `DataLoader`) or dicts with
            `pixel_values` and `labels`.
        max_batches: evaluate only the first batches.

    Example:
    ```python
    >>> from optimum_d2prune.evaluation import image_accuracy
    >>> result = image_accuracy(model, val_loader)
    >>> result.top1, result.top5
    ```
    """
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"`max_batches` must be a positive integer or None, got {max_batches!r}.")
    device = next(model.parameters()).device
    correct1 = correct5 = total = 0
    classes = None
    with calibration_context(model):
        for index, batch in enumerate(tqdm(loader, desc="accuracy", leave=False)):
            if max_batches is not None and index >= max_batches:
                break
            images, labels = _split_batch(batch, index)
            output = model(images.to(device=device, dtype=next(model.parameters()).dtype))
            logits = class_logits(output)
            labels = labels.to(logits.device).reshape(-1)
            classes = logits.shape[-1]
            top = logits.topk(min(5, classes), dim=-1).indices
            correct1 += int((top[:, 0] == labels).sum())
            correct5 += int((top == labels[:, None]).any(-1).sum())
            total += labels.numel()
    if total == 0:
        raise ValueError("`loader` yielded no images.")
    result = ImageAccuracy(correct1 / total, correct5 / total if classes >= 5 else None, total)
    logger.info("Image accuracy on %d images: top-1 %.4f top-5 %s", total, result.top1, result.top5)
    return result
