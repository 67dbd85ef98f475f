"""Calibration batches as the model takes them: materialised from any iterable and checked, one batch at a time,
before any work (types, shapes, masks); an encoder-decoder's decoder inputs derived from the text when absent."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import InputError

Batch = Union[torch.Tensor, dict[str, Any]]

#: float model inputs a calibration batch may hold instead of token ids: key -> its dimensions, named
FLOAT_INPUTS = {"pixel_values": ("B", "C", "H", "W"), "input_features": ("B", "features", "frames"),
                "input_values": ("B", "samples")}
#: what a batch may feed the model: text, images (`pixel_values`), audio features (`input_features`), raw audio
#: (`input_values`) (and an encoder-decoder's `decoder_input_ids` besides)
INPUT_KEYS = ("input_ids", *FLOAT_INPUTS)


def prepare_batches(calib_loader: Iterable[Batch], model: Optional[nn.Module] = None) -> list[dict[str, torch.Tensor]]:
    """Materialise and check the calibration batches (raises `InputError` before any work on bad input). With
    `model`, an encoder-decoder's text batches get `decoder_input_ids` from the model's own label shift."""
    if isinstance(calib_loader, (torch.Tensor, dict)):
        raise InputError(
            "`calib_loader` must be an iterable of batches (e.g. a list or a DataLoader), not a single "
            f"{type(calib_loader).__name__}; wrap it in a list."
        )
    try:
        iterator = iter(calib_loader)
    except TypeError:
        raise InputError(f"`calib_loader` must be an iterable of batches, got {type(calib_loader).__name__}.") from None
    batches = [_as_model_inputs(batch, i) for i, batch in enumerate(iterator)]
    if not batches:
        raise InputError("`calib_loader` yielded no batches: give at least one calibration sequence.")
    kinds = {next(key for key in INPUT_KEYS if key in b) for b in batches}
    if len(kinds) > 1:
        raise InputError(f"`calib_loader` mixes batches of different inputs ({', '.join(sorted(kinds))}).")
    if model is not None and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        batches = [_with_decoder_inputs(model, b) for b in batches]
    return batches


def _as_model_inputs(batch: Batch, index: int) -> dict[str, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 1 and isinstance(batch[0], torch.Tensor):
        batch = batch[0]  # e.g. a TensorDataset/DataLoader yields (tensor,) or (images, labels)
    if isinstance(batch, torch.Tensor):
        if not batch.is_floating_point():
            batch = {"input_ids": batch}
        else:
            batch = {"input_features" if batch.dim() == 3 else "pixel_values": batch}
    if not isinstance(batch, dict):
        raise InputError(
            f"Calibration batch {index} is a {type(batch).__name__}; expected a LongTensor [B, T], a dict with "
            "`input_ids` (and optional `attention_mask`), image `pixel_values`, audio `input_features` or raw audio "
            "`input_values`."
        )
    if "input_ids" in batch:
        out = {"input_ids": _token_ids(batch["input_ids"], "input_ids", index)}
        out.update(_mask(batch, "attention_mask", out["input_ids"], index))
    elif any(key in batch for key in FLOAT_INPUTS):
        key = next(key for key in FLOAT_INPUTS if key in batch)
        value, layout = torch.as_tensor(batch[key]), FLOAT_INPUTS[key]
        if value.dim() != len(layout) or not value.is_floating_point() or value.shape[0] == 0:
            raise InputError(f"Calibration batch {index}: `{key}` must be a float tensor [{', '.join(layout)}], got "
                             f"{tuple(value.shape)}.")
        out = {key: value}
    else:
        raise InputError(f"Calibration batch {index} has none of {', '.join(INPUT_KEYS)} (keys: {sorted(batch)}).")
    if batch.get("decoder_input_ids") is not None:
        out["decoder_input_ids"] = _token_ids(batch["decoder_input_ids"], "decoder_input_ids", index)
        out.update(_mask(batch, "decoder_attention_mask", out["decoder_input_ids"], index))
    return out


def _token_ids(value: Any, name: str, index: int) -> torch.Tensor:
    ids = torch.as_tensor(value)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.is_floating_point():
        raise InputError(f"Calibration batch {index}: `{name}` must be an integer tensor [B, T], got "
                         f"{tuple(ids.shape)}.")
    if ids.shape[0] == 0 or ids.shape[1] < 2:
        raise InputError(f"Calibration batch {index} has `{name}` of shape {tuple(ids.shape)}: every sequence needs at "
                         "least 2 tokens.")
    return ids.long()


def _mask(batch: dict, name: str, ids: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
    if batch.get(name) is None:
        return {}
    mask = torch.as_tensor(batch[name])
    mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
    if mask.shape != ids.shape:
        raise InputError(f"Calibration batch {index}: `{name}` {tuple(mask.shape)} does not match the token ids "
                         f"{tuple(ids.shape)}.")
    if (mask.sum(1) < 2).any():
        raise InputError(f"Calibration batch {index} has a sequence with fewer than 2 attended tokens (`{name}`).")
    return {name: mask.long()}


def _with_decoder_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text batch for an encoder-decoder without decoder inputs: the decoder reads the same text, shifted right
    by the model's own rule (what it does with `labels` in training), with the same padding mask."""
    shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if "decoder_input_ids" in batch or "input_ids" not in batch or shift is None:
        return batch
    out = dict(batch, decoder_input_ids=shift(labels=batch["input_ids"]))
    if "attention_mask" in batch:
        out["decoder_attention_mask"] = batch["attention_mask"]
    return out
