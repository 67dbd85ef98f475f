"""D²Prune's global strategy (the paper's Algorithm 1, plus an "all updated" candidate): prune once per candidate
(q, k or v left un-updated in every block, or every projection updated), score each on held-out calibration data
(the last eighth), then prune again with the winner on all calibration data.

Language models are scored by held-out perplexity, image classifiers by the mean KL divergence of the pruned
model's class distribution from the dense one (no labels needed). Costs five prunes and four short evaluations, and
one copy of the original targeted weights. A model without class logits (a headless vision encoder) has nothing
to score the candidates by: `strategy="auto"` then makes the choice per block.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from ...calibration.hooks import calibration_context
from ...errors import UnsupportedModelError
from ...evaluation.image import class_logits
from ...evaluation.perplexity import perplexity_of_batches
from ..base import ModelRun

logger = logging.getLogger(__name__)

#: the candidates: the projection left un-updated in every block, or "none" (every one updated)
CANDIDATES = ("q", "k", "v", "none")


def resolve_strategy(strategy: str, job: ModelRun) -> str:
    """"layer" or "global": `"auto"` is "global" for image classifiers (images in, class logits out), else
    "layer"; an explicit "global" on a model with nothing to score candidates by is refused before any work."""
    images = "pixel_values" in job.batches[0]
    if strategy == "layer" or (strategy == "auto" and not images):
        return "layer"
    scorable = _has_class_logits(job) if images else _has_lm_loss(job.model)
    if scorable:
        return "global"
    if strategy == "auto":
        logger.info("The model gives no class logits to score the global search's candidates by: the q/k/v choice is "
                    "made per block.")
        return "layer"
    what = "class logits" if images else "a language-model loss (a model with an LM head)"
    raise UnsupportedModelError(f"`strategy='global'` scores candidates on held-out data and needs {what}, which "
                                f"{type(job.model).__name__} does not give; use `strategy='layer'` (or 'auto').")


def global_search(method: Any, job: ModelRun):
    calib, held_out = _split_held_out(job.batches)
    images = "pixel_values" in job.batches[0]
    flat = job.plan.targets()
    original = {t.name: t.weight().detach().to("cpu", copy=True) for t in flat}
    reference = _logits(job.model, job.adapter, held_out) if images else None
    start = time.perf_counter()
    scores: dict[str, float] = {}
    for candidate in CANDIDATES:
        _restore(flat, original)
        job.run(method.with_skip_update(candidate), calib, checkpoint=False)
        if images:
            scores[candidate] = class_kl(reference, _logits(job.model, job.adapter, held_out))
        else:
            scores[candidate] = float(perplexity_of_batches(job.model, held_out, desc="held-out perplexity"))
        logger.info("global search: %s -> held-out %s %.5g", describe(candidate), _metric(images), scores[candidate])
    best = min(scores, key=scores.get)
    _restore(flat, original)
    report = job.run(method.with_skip_update(best), job.batches)
    report.global_search = scores
    report.global_metric = _metric(images)
    report.seconds = time.perf_counter() - start  # the whole search: five prunes and four evaluations
    for record in report.attention:
        record.strategy = "global"
    return report


def describe(candidate: str) -> str:
    return "all updated" if candidate == "none" else f"{candidate} left un-updated"


def class_kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over samples of KL(softmax(dense_logits) ‖ softmax(logits)), in fp32."""
    log_p, log_q = dense_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def _metric(images: bool) -> str:
    return "logit KL" if images else "PPL"


def _restore(targets: list, snapshot: dict[str, torch.Tensor]) -> None:
    for t in targets:
        t.write(snapshot[t.name])


def _split_held_out(batches: list[dict]) -> tuple[list[dict], list[dict]]:
    """(search batches, held-out batches): the last eighth of the batches, or of the samples of a single batch."""
    if len(batches) >= 2:
        held = max(1, len(batches) // 8)
        return batches[:-held], batches[-held:]
    size = next(iter(batches[0].values())).shape[0]
    if size < 2:
        raise UnsupportedModelError("The global q/k/v search holds out part of the calibration data: give at least 2 "
                                    "samples, or use `strategy='layer'`.")
    held = max(1, size // 8)
    return [{k: v[:-held] for k, v in batches[0].items()}], [{k: v[-held:] for k, v in batches[0].items()}]


def _has_class_logits(job: ModelRun) -> bool:
    """One forward of one held-out image batch (before anything is pruned): are there class logits?"""
    batch = _split_held_out(job.batches)[1][:1]
    with torch.no_grad(), calibration_context(job.model):
        output = job.adapter.forward_model(job.model, _to_model(job.model, batch[0]))
    return class_logits(output) is not None


def _has_lm_loss(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is not None


def _to_model(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    param = next(model.parameters())
    device = param.device if param.device.type != "meta" else torch.device("cpu")
    return {k: v.to(device=device, dtype=param.dtype) if v.is_floating_point() else v.to(device)
            for k, v in batch.items()}


@torch.no_grad()
def _logits(model: nn.Module, adapter, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """fp32 class logits of `batches`, concatenated (on CPU)."""
    out = []
    with calibration_context(model):
        for batch in batches:
            output = adapter.forward_model(model, _to_model(model, {"pixel_values": batch["pixel_values"]}))
            out.append(class_logits(output).float().cpu())
    return torch.cat(out)
