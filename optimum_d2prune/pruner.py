"""`D2Pruner`: the user-facing entry point (orchestration only: checks, engine runs, the global q/k/v search)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import nn

from .architectures import PROJECTIONS, ArchitectureAdapter, get_adapter
from .configuration import D2PruneConfig
from .distributed import distributed_session
from .engine import PruneTarget, PruningEngine
from .hooks import calibration_context
from .preflight import check_before_pruning
from .report import PruneReport
from .vision import class_kl, class_logits

logger = logging.getLogger(__name__)

#: candidates of the global search: the projection left un-updated in every block, or "all" (every one updated)
GLOBAL_CANDIDATES = (*PROJECTIONS, "all")

Batch = Union[torch.Tensor, dict[str, Any]]


class D2Pruner:
    """Prunes a transformers (or timm) model in place with D²Prune or a baseline, block by block.

    After `prune`, `pruner.report` holds a `PruneReport` (per-layer sparsity, reconstruction error and solver,
    the per-block attention choice with its error and KL, time and peak memory); `print(pruner.report)` shows it.

    Example:
    ```python
    >>> from optimum_d2prune import D2PruneConfig, D2Pruner
    >>> from optimum_d2prune.calibration import get_calibration_dataset
    >>> calib = get_calibration_dataset("c4", tokenizer, num_samples=128, seq_len=2048)
    >>> pruner = D2Pruner(D2PruneConfig(sparsity=0.5))
    >>> model = pruner.prune(model, calib)
    >>> print(pruner.report)
    ```
    """

    def __init__(self, config: Optional[D2PruneConfig] = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise ValueError("Pass either a D2PruneConfig or keyword arguments, not both.")
        self.config = config if config is not None else D2PruneConfig(**kwargs)
        if not isinstance(self.config, D2PruneConfig):
            raise TypeError(f"`config` must be a D2PruneConfig, got {type(self.config).__name__}.")
        self.report: Optional[PruneReport] = None

    def prune(
        self, model: nn.Module, calib_loader: Iterable[Batch], adapter: Optional[ArchitectureAdapter] = None
    ) -> nn.Module:
        """Prune `model` in place on the calibration batches and return it.

        Args:
            model: a transformers model whose blocks can be found (causal LMs, vision transformers; see
                docs/architectures.md), or a timm VisionTransformer.
            calib_loader: an iterable of batches: a LongTensor `[B, T]` (or `[T]`) of input ids, a dict with
                `input_ids` and optional `attention_mask`, a float tensor `[B, 3, H, W]` or a dict with
                `pixel_values`. A `torch.utils.data.DataLoader` works as is.
            adapter: the architecture adapter to use (default: the model's hand-written one if its family has
                one, else `GenericAdapter`, which finds the blocks and q/k/v by name).
        """
        if adapter is None:
            adapter = get_adapter(model)
        else:
            adapter.validate(model)
        batches = prepare_batches(calib_loader)
        engine = PruningEngine(self.config, adapter)
        plan = engine.plan(model)  # every check happens before the model is touched
        check_before_pruning(model, batches, self.config, plan)
        strategy = self.config.resolve_dynamic_strategy(images="pixel_values" in batches[0])
        with distributed_session():
            if self.config.uses_attention_awareness and self.config.attention_update == "dynamic" and (
                strategy == "global"
            ):
                self.report = self._global_search(model, batches, adapter, plan)
            else:
                self.report = engine.run(model, batches, plan)
        logger.info("%s", self.report.summary())
        return model

    def save(self, model: nn.Module, save_dir: Union[str, os.PathLike], tokenizer: Any = None, **kwargs: Any):
        """Save the pruned `model` as a standard checkpoint plus `d2prune_config.json` and a model card (see
        `optimum_d2prune.hub.save_pruned` for the keyword arguments: `overwrite`, `calibration`, `evaluation`...)."""
        from .hub import save_pruned

        return save_pruned(model, save_dir, self.config, self.report, tokenizer, **kwargs)

    def _global_search(self, model: nn.Module, batches: list[dict], adapter, plan) -> PruneReport:
        """The paper's Algorithm 1, plus an "all updated" candidate: prune once per candidate (q, k or v left
        un-updated in every block, or every projection updated), score each on held-out calibration data (the
        last eighth), then prune again with the winner on all calibration data.

        Language models are scored by held-out perplexity, vision models by the mean KL divergence of the pruned
        model's class distribution from the dense one (no labels needed). Costs five prunes and four short
        evaluations, and one copy of the original targeted weights.
        """
        calib, held_out = _split_held_out(batches)
        images = "pixel_values" in batches[0]
        flat = [t for block in plan[2] for t in block]
        original = _snapshot(flat)
        reference = None if not images else _logits(model, adapter, held_out)
        search_config = self.config.replace(checkpoint_dir=None)  # the candidates must not share checkpoints
        start = time.perf_counter()
        scores: dict[str, float] = {}
        for candidate in GLOBAL_CANDIDATES:
            _restore(flat, original)
            PruningEngine(search_config, adapter, attention_update=candidate).run(model, calib, plan)
            if images:
                scores[candidate] = class_kl(reference, _logits(model, adapter, held_out))
            else:
                scores[candidate] = _heldout_perplexity(model, held_out)
            logger.info("global search: %s -> held-out %s %.5g", _describe(candidate), _metric(images),
                        scores[candidate])
        best = min(scores, key=scores.get)
        _restore(flat, original)
        report = PruningEngine(self.config, adapter, attention_update=best).run(model, batches, plan)
        report.global_search = scores
        report.global_metric = _metric(images)
        report.seconds = time.perf_counter() - start  # the whole search: five prunes and four evaluations
        for record in report.attention:
            record.strategy = "global"
        return report


def prepare_batches(calib_loader: Iterable[Batch]) -> list[dict[str, torch.Tensor]]:
    """Materialise and check the calibration batches (raises `ValueError` before any work on bad input)."""
    if isinstance(calib_loader, (torch.Tensor, dict)):
        raise ValueError(
            "`calib_loader` must be an iterable of batches (e.g. a list or a DataLoader), not a single "
            f"{type(calib_loader).__name__}; wrap it in a list."
        )
    try:
        iterator = iter(calib_loader)
    except TypeError:
        raise ValueError(f"`calib_loader` must be an iterable of batches, got {type(calib_loader).__name__}.") from None
    batches = [_as_model_inputs(batch, i) for i, batch in enumerate(iterator)]
    if not batches:
        raise ValueError("`calib_loader` yielded no batches: give at least one calibration sequence.")
    kinds = {"input_ids" in b for b in batches}
    if len(kinds) > 1:
        raise ValueError("`calib_loader` mixes token batches and image batches.")
    return batches


def _as_model_inputs(batch: Batch, index: int) -> dict[str, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 1 and isinstance(batch[0], torch.Tensor):
        batch = batch[0]  # e.g. a TensorDataset/DataLoader yields (tensor,) or (images, labels)
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            batch = {"pixel_values": batch}
        else:
            batch = {"input_ids": batch}
    if not isinstance(batch, dict):
        raise ValueError(
            f"Calibration batch {index} is a {type(batch).__name__}; expected a LongTensor [B, T], a dict with "
            "`input_ids` (and optional `attention_mask`), or image `pixel_values`."
        )
    if "input_ids" in batch:
        ids = torch.as_tensor(batch["input_ids"])
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"Calibration batch {index}: `input_ids` must be an integer tensor [B, T], got {tuple(ids.shape)}.")
        if ids.shape[0] == 0 or ids.shape[1] < 2:
            raise ValueError(
                f"Calibration batch {index} has shape {tuple(ids.shape)}: every sequence needs at least 2 tokens."
            )
        out = {"input_ids": ids.long()}
        if batch.get("attention_mask") is not None:
            mask = torch.as_tensor(batch["attention_mask"])
            mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
            if mask.shape != ids.shape:
                raise ValueError(f"Calibration batch {index}: `attention_mask` {tuple(mask.shape)} does not match "
                                 f"`input_ids` {tuple(ids.shape)}.")
            if (mask.sum(1) < 2).any():
                raise ValueError(f"Calibration batch {index} has a sequence with fewer than 2 attended tokens.")
            out["attention_mask"] = mask.long()
        return out
    if "pixel_values" in batch:
        pixels = torch.as_tensor(batch["pixel_values"])
        if pixels.dim() != 4 or not pixels.is_floating_point() or pixels.shape[0] == 0:
            raise ValueError(f"Calibration batch {index}: `pixel_values` must be a float tensor [B, C, H, W], got "
                             f"{tuple(pixels.shape)}.")
        return {"pixel_values": pixels}
    raise ValueError(f"Calibration batch {index} has neither `input_ids` nor `pixel_values` (keys: {sorted(batch)}).")


def _snapshot(targets: list[PruneTarget]) -> dict[str, torch.Tensor]:
    return {t.name: t.weight().detach().to("cpu", copy=True) for t in targets}


def _restore(targets: list[PruneTarget], snapshot: dict[str, torch.Tensor]) -> None:
    for t in targets:
        t.write(snapshot[t.name])


def _split_held_out(batches: list[dict]) -> tuple[list[dict], list[dict]]:
    """(search batches, held-out batches): the last eighth of the batches, or of the samples of a single batch."""
    if len(batches) >= 2:
        held = max(1, len(batches) // 8)
        return batches[:-held], batches[-held:]
    size = next(iter(batches[0].values())).shape[0]
    if size < 2:
        raise ValueError("The global q/k/v search holds out part of the calibration data: give at least 2 samples.")
    held = max(1, size // 8)
    return [{k: v[:-held] for k, v in batches[0].items()}], [{k: v[-held:] for k, v in batches[0].items()}]


def _metric(images: bool) -> str:
    return "logit KL" if images else "PPL"


def _describe(candidate: str) -> str:
    return "all updated" if candidate == "all" else f"{candidate} left un-updated"


@torch.no_grad()
def _logits(model: nn.Module, adapter, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """fp32 class logits of `batches`, concatenated (on CPU)."""
    param = next(model.parameters())
    device = param.device if param.device.type != "meta" else torch.device("cpu")
    out = []
    with calibration_context(model):
        for batch in batches:
            pixels = batch["pixel_values"].to(device=device, dtype=param.dtype)
            output = adapter.forward_model(model, {"pixel_values": pixels})
            out.append(class_logits(output).float().cpu())
    return torch.cat(out)


def _heldout_perplexity(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    from .evaluation.perplexity import perplexity_of_batches

    return float(perplexity_of_batches(model, batches, desc="held-out perplexity"))
