"""Small vision transformers trained on real data that ships with a PyPI package (scikit-learn's `load_digits`).

No pretrained ViT weights are reachable offline, so the vision tests and benchmark use two tiny DeiT-style models
trained here on the 1,797 real 8×8 handwritten digits (upsampled to 32×32, patch 4 → 64 patches + cls
[+ distillation] token): a transformers `DeiTForImageClassification` and a timm `VisionTransformer` (fused qkv).
Training is deterministic (seeded, one CPU thread) and takes well under 3 minutes each on 2 CPU cores; the
weights are cached under `~/.cache/optimum_d2prune/fixtures` (or `$OPTIMUM_D2PRUNE_CACHE`), never in the repo.

Example:
```python
>>> from optimum_d2prune.testing.digits import digits_model, load_digits_splits
>>> fixture = digits_model("timm")           # trains once (about a minute), then loads from the cache
>>> fixture.test_accuracy, fixture.train_seconds
```
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluation.image import class_logits

logger = logging.getLogger(__name__)

KINDS = ("deit", "timm")
FIXTURE_VERSION = 1
IMAGE_SIZE = 32
PATCH_SIZE = 4
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsRecipe:
    """Architecture and training hyperparameters of a digits fixture (part of its cache key)."""

    hidden_size: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    max_shift: int = 3  # random translation (pixels at 32×32) as augmentation
    seed: int = 0


@dataclass
class DigitsSplits:
    """Images `[N, 3, 32, 32]` (normalised to [-1, 1]) and labels of a stratified train/test split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass
class DigitsFixture:
    """A trained digits model with its measured test accuracy and training time."""

    kind: str
    model: nn.Module
    test_accuracy: float
    train_seconds: float
    recipe: DigitsRecipe = field(default_factory=DigitsRecipe)
    path: Optional[Path] = None
    from_cache: bool = False


@contextlib.contextmanager
def torch_threads(num: int) -> Iterator[None]:
    """Run with `num` intra-op threads (restored on exit). One thread is fastest for these tiny models."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cache_dir(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Fixture cache: `path`, else `$OPTIMUM_D2PRUNE_CACHE/fixtures`, else `~/.cache/optimum_d2prune/fixtures`."""
    if path is not None:
        return Path(path)
    root = os.environ.get("OPTIMUM_D2PRUNE_CACHE")
    return Path(root) / "fixtures" if root else Path.home() / ".cache" / "optimum_d2prune" / "fixtures"


def digits_to_images(flat: torch.Tensor, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """`[N, 64]` digit pixels (0..16) -> `[N, 3, S, S]` in [-1, 1] (bilinear upsampling, grey replicated to RGB)."""
    x = flat.float().reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def load_digits_splits(test_fraction: float = 0.2, seed: int = 0) -> DigitsSplits:
    """scikit-learn's digits, split stratified (1,437 train / 360 test with the defaults)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError("The digits fixtures need scikit-learn: `pip install scikit-learn`.") from err
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    return DigitsSplits(
        digits_to_images(torch.as_tensor(x_train)), torch.as_tensor(y_train).long(),
        digits_to_images(torch.as_tensor(x_test)), torch.as_tensor(y_test).long(),
    )


def build_digits_model(kind: str, recipe: DigitsRecipe = DigitsRecipe()) -> nn.Module:
    """An untrained (seeded) `DeiTForImageClassification` ("deit") or timm `VisionTransformer` ("timm").

    The initialisation draws from the global RNG: it is seeded inside `fork_rng`, so the caller's RNG state is
    left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return _build(kind, recipe)


def _build(kind: str, recipe: DigitsRecipe) -> nn.Module:
    if kind == "deit":
        from transformers import DeiTConfig, DeiTForImageClassification

        config = DeiTConfig(
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3, hidden_size=recipe.hidden_size,
            num_hidden_layers=recipe.depth, num_attention_heads=recipe.heads,
            intermediate_size=recipe.mlp_ratio * recipe.hidden_size, num_labels=NUM_CLASSES,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        config._attn_implementation = "sdpa"
        return DeiTForImageClassification(config)
    if kind == "timm":
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError as err:
            raise ImportError("The timm digits fixture needs timm: `pip install timm`.") from err
        return VisionTransformer(
            img_size=IMAGE_SIZE, patch_size=PATCH_SIZE, in_chans=3, num_classes=NUM_CLASSES,
            embed_dim=recipe.hidden_size, depth=recipe.depth, num_heads=recipe.heads,
            mlp_ratio=recipe.mlp_ratio, qkv_bias=True,
        )
    raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")


def _shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation of each image by up to `max_shift` pixels (zero = background, i.e. -1, padding)."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_digits_model(model: nn.Module, splits: DigitsSplits, recipe: DigitsRecipe = DigitsRecipe()) -> float:
    """Train in place with AdamW + warmup/cosine schedule; returns the training seconds."""
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    n = splits.train_images.shape[0]
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    warmup = steps_per_epoch * 2
    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start = time.perf_counter()
    model.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, recipe.batch_size):
            idx = order[i:i + recipe.batch_size]
            images = _shift(splits.train_images[idx], recipe.max_shift, generator)
            loss = F.cross_entropy(class_logits(model(images)), splits.train_labels[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        logger.debug("digits epoch %d loss %.4f", epoch, float(loss.detach()))
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def top1_accuracy(model: nn.Module, splits: DigitsSplits, batch_size: int = 512) -> float:
    """Top-1 accuracy on the test split."""
    model.eval()
    correct = 0
    for i in range(0, splits.test_images.shape[0], batch_size):
        logits = class_logits(model(splits.test_images[i:i + batch_size]))
        correct += int((logits.argmax(-1) == splits.test_labels[i:i + batch_size]).sum())
    return correct / splits.test_images.shape[0]


def _cache_key(kind: str, recipe: DigitsRecipe) -> str:
    blob = json.dumps({"kind": kind, "version": FIXTURE_VERSION, **asdict(recipe)}, sort_keys=True)
    return f"digits-{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def digits_model(
    kind: str,
    recipe: DigitsRecipe = DigitsRecipe(),
    cache: Optional[Union[str, os.PathLike]] = None,
    splits: Optional[DigitsSplits] = None,
    retrain: bool = False,
) -> DigitsFixture:
    """The trained digits model of `kind` ("deit" or "timm"), from the cache or trained now (then cached).

    The cache holds the state dict and a JSON with the test accuracy and training time measured when it was
    trained; a loaded model's accuracy is re-measured and must match, else it is retrained.
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    splits = splits if splits is not None else load_digits_splits(seed=recipe.seed)
    folder = cache_dir(cache)
    key = _cache_key(kind, recipe)
    weights, meta_path = folder / f"{key}.pt", folder / f"{key}.json"
    model = build_digits_model(kind, recipe)
    with torch_threads(1):
        if not retrain and weights.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            accuracy = top1_accuracy(model, splits)
            if abs(accuracy - meta["test_accuracy"]) < 1e-9:
                model.eval()
                return DigitsFixture(kind, model, accuracy, meta["train_seconds"], recipe, weights, True)
            logger.warning("Cached %s gives %.4f instead of %.4f: retraining.", weights, accuracy,
                           meta["test_accuracy"])
            model = build_digits_model(kind, recipe)
        seconds = train_digits_model(model, splits, recipe)
        accuracy = top1_accuracy(model, splits)
    logger.info("Trained digits %s in %.1f s: test top-1 %.4f", kind, seconds, accuracy)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, weights)
    meta_path.write_text(json.dumps({"kind": kind, "test_accuracy": accuracy, "train_seconds": seconds,
                                     "recipe": asdict(recipe), "torch": torch.__version__}, indent=2))
    return DigitsFixture(kind, model, accuracy, seconds, recipe, weights, False)


def calibration_batches(
    splits: DigitsSplits, num_samples: int = 128, batch_size: int = 32, seed: int = 0
) -> list[torch.Tensor]:
    """`num_samples` random training images as `[B, 3, 32, 32]` batches (a local generator; global RNG untouched)."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(splits.train_images.shape[0], generator=generator)[:num_samples]
    images = splits.train_images[idx]
    return [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]


def eval_batches(splits: DigitsSplits, batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The test split as `(images, labels)` batches (what `evaluation.image_accuracy` takes)."""
    n = splits.test_images.shape[0]
    return [(splits.test_images[i:i + batch_size], splits.test_labels[i:i + batch_size])
            for i in range(0, n, batch_size)]
