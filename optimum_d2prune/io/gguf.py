"""GGUF metadata of the file a model was dequantized from: where it came from (for the card) and how it was
quantized (the card states that the pruned weights are dequantized from it). Read with the `gguf` package."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file says about its weights: the Hub repo it was converted from, its license, its quantization
    type (e.g. "Q4_1"; "F16" for an unquantized file)."""

    file: str
    base_model: Optional[str] = None
    license: Optional[str] = None
    quantization: Optional[str] = None


def is_gguf_quantization(quantization_config: Any) -> bool:
    """Whether a transformers `quantization_config` (object or dict) is a GGUF one."""
    if quantization_config is None:
        return False
    method = (
        quantization_config.get("quant_method")
        if isinstance(quantization_config, Mapping)
        else getattr(quantization_config, "quant_method", None)
    )
    return str(getattr(method, "value", method)).lower() == "gguf"


def _quantization(fields: Mapping, tensors: list) -> Optional[str]:
    """`general.file_type` as gguf's `LlamaFileType` name ("MOSTLY_Q4_1" -> "Q4_1"), else the most common tensor
    type among the quantized ones."""
    from gguf import LlamaFileType

    field = fields.get("general.file_type")
    if field is not None:
        try:
            return LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_")
        except (ValueError, TypeError):
            pass
    kinds = Counter(t.tensor_type.name for t in tensors)
    quantized = [k for k, _ in kinds.most_common() if k not in _FLOAT_TYPES]
    return quantized[0] if quantized else (kinds.most_common(1)[0][0] if kinds else None)


def read_gguf_info(path: Path) -> Optional[GgufInfo]:
    """The metadata of a GGUF file, or None (logged) when the file cannot be read as GGUF."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        fields, tensors = reader.fields, reader.tensors
    except Exception as err:  # noqa: BLE001 - any failure of a third-party parser means "no metadata"
        logger.info("Could not read GGUF metadata of %s (%s: %s).", path, type(err).__name__, err)
        return None

    def get(key: str) -> Optional[str]:
        field = fields.get(key)
        try:
            return str(field.contents()) if field is not None else None
        except Exception:  # noqa: BLE001 - a malformed field is one missing value
            return None

    base_model = None
    for key in ("general.source.repo_url", "general.base_model.0.repo_url"):
        url = get(key)
        if url and "huggingface.co/" in url:
            base_model = url.rstrip("/").split("huggingface.co/")[-1]
            break
    return GgufInfo(file=Path(path).name, base_model=base_model, license=get("general.license"),
                    quantization=_quantization(fields, tensors))
