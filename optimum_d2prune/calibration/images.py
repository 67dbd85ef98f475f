"""Image calibration data: an image folder, a `datasets` image dataset or a Hub id, with the model's own preprocessing.

The preprocessing is the model's: a transformers image processor (`AutoImageProcessor`), or timm's
`resolve_data_config` + `create_transform` (eval transform) for a timm model, or any callable PIL image -> tensor.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..extras import require

logger = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

Preprocess = Callable[[Any], torch.Tensor]


def image_preprocessor(model_or_processor: Any) -> Preprocess:
    """A function `PIL image -> float tensor [3, H, W]` with the model's own evaluation preprocessing.

    Args:
        model_or_processor: a timm model (uses `timm.data.resolve_data_config` + `create_transform`), a
            transformers image processor, a Hub id / local folder of one (`AutoImageProcessor`), a transformers
            model saved with its processor (its `name_or_path`), or a callable that already does the job.
    """
    target = model_or_processor
    if isinstance(target, nn.Module) and type(target).__module__.startswith("timm."):  # timm model
        timm_data = require("timm.data")
        create_transform, resolve_data_config = timm_data.create_transform, timm_data.resolve_data_config
        transform = create_transform(**resolve_data_config(model=target), is_training=False)
        return lambda image: transform(image.convert("RGB"))
    if isinstance(target, nn.Module):
        name = getattr(target, "name_or_path", "") or getattr(getattr(target, "config", None), "_name_or_path", "")
        if not name:
            raise ValueError(
                f"{type(target).__name__} has no `name_or_path` to load its image processor from: pass the image "
                "processor (e.g. `AutoImageProcessor.from_pretrained(...)`) or a callable image -> tensor instead."
            )
        target = name
    if isinstance(target, (str, os.PathLike)):
        from transformers import AutoImageProcessor

        try:
            target = AutoImageProcessor.from_pretrained(os.fspath(target))
        except OSError as err:
            raise ValueError(
                f"Could not load an image processor from {os.fspath(target)!r} ({err}). Pass the image processor "
                "or a callable image -> tensor instead."
            ) from err
    if hasattr(target, "preprocess") and callable(target):  # transformers image processor
        processor = target
        return lambda image: processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
    if callable(target):
        return target
    raise TypeError(f"Cannot build a preprocessing function from {type(model_or_processor).__name__}.")


def _folder_items(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Image files under `root` (recursive, sorted) and their labels: the index of their top-level subfolder."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}.")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(p.relative_to(root).parts[0], -1) if len(p.relative_to(root).parts) > 1 else -1 for p in files]
    return files, labels, classes


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this dataset cannot be reached from here" (network, offline mode, cache miss):
    OSError covers requests' and huggingface_hub's HTTP errors and datasets' not-found errors."""
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

        errors += [HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled]
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    try:
        from datasets.exceptions import DatasetNotFoundError

        errors.append(DatasetNotFoundError)
    except ImportError:  # pragma: no cover - older datasets
        pass
    return tuple(errors)


def _hub_dataset(name: str, split: str):
    load_dataset = require("datasets").load_dataset
    try:
        return load_dataset(name, split=split)
    except _unavailable_errors() as err:  # network, missing cache, hub errors; anything else is a real bug
        raise ConnectionError(
            f"Could not load {name!r} (split {split!r}) from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Pass a local image folder (one subfolder per class, or flat) or a `datasets.Dataset` instead."
        ) from err


def _image_column(dataset, image_column: Optional[str]) -> str:
    columns = list(getattr(dataset, "column_names", []) or [])
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"`image_column`={image_column!r} is not a column of the dataset (columns: {columns}).")
        return image_column
    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        if type(feature).__name__ == "Image":
            return name
    for name in ("image", "img", "pixel_values"):
        if name in columns:
            return name
    raise ValueError(f"No image column found among {columns}: pass `image_column`.")


def _label_column(dataset, label_column: Optional[str]) -> Optional[str]:
    columns = list(getattr(dataset, "column_names", []) or [])
    if label_column is not None:
        return label_column
    return next((c for c in ("label", "labels", "fine_label") if c in columns), None)


def get_image_calibration_dataset(
    source: Any,
    preprocess: Any,
    num_samples: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    split: str = "train",
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    with_labels: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Random calibration images as `{"pixel_values": [B, 3, H, W]}` batches, ready for `D2Pruner.prune`.

    Args:
        source: a local image folder (searched recursively; top-level subfolders are classes), a `datasets`
            dataset with an image column, or a Hub dataset id (loaded with `datasets.load_dataset`; needs the
            network or a local cache).
        preprocess: the model (timm or transformers), its image processor, or a callable PIL image -> tensor;
            see `image_preprocessor`.
        num_samples: images to draw (all of them if the source has fewer).
        batch_size: images per batch.
        seed: seed of the local RNG choosing the images (global RNGs are untouched).
        split: split of a Hub dataset.
        image_column / label_column: columns of a dataset (default: the `Image` feature, and `label`/`labels`).
        with_labels: also return `labels` (class index; -1 for a flat folder), e.g. to evaluate with
            `evaluation.image_accuracy`.

    Example:
    ```python
    >>> from optimum_d2prune.vision import get_image_calibration_dataset
    >>> calib = get_image_calibration_dataset("imagenet/train", model, num_samples=128)   # timm or transformers
    >>> D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, calib)
    ```
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    transform = image_preprocessor(preprocess)
    from PIL import Image

    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        files, file_labels, _ = _folder_items(Path(source))
        count = len(files)

        def load(i: int):
            with Image.open(files[i]) as image:
                return image.convert("RGB"), file_labels[i]
    else:
        dataset = _hub_dataset(os.fspath(source), split) if isinstance(source, (str, os.PathLike)) else source
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"`source` must be an image folder, a `datasets.Dataset` or a Hub id, got {type(source).__name__}."
            )
        image_key = _image_column(dataset, image_column)
        label_key = _label_column(dataset, label_column)
        count = len(dataset)

        def load(i: int):
            row = dataset[i]
            image = row[image_key]
            if not isinstance(image, Image.Image):
                image = Image.fromarray(image) if hasattr(image, "__array__") else Image.open(image["path"])
            return image, int(row[label_key]) if label_key is not None else -1
    if count == 0:
        raise ValueError(f"{source!r} holds no images.")
    chosen = random.Random(seed).sample(range(count), min(num_samples, count))
    if len(chosen) < num_samples:
        logger.warning("Only %d images available; using all of them for calibration.", len(chosen))
    batches = []
    for start in range(0, len(chosen), batch_size):
        pixels, batch_labels = [], []
        for i in chosen[start:start + batch_size]:
            image, label = load(i)
            pixels.append(transform(image))
            batch_labels.append(label)
        batch = {"pixel_values": torch.stack(pixels).float()}
        if with_labels:
            batch["labels"] = torch.tensor(batch_labels, dtype=torch.long)
        batches.append(batch)
    logger.info("Calibration: %d images from %s (seed %d).", len(chosen), source, seed)
    return batches
