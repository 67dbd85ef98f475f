"""Pruned checkpoints as ordinary Hugging Face artifacts: save, verify on load, model card, push to the Hub.

A checkpoint is a plain `save_pretrained` folder (dense safetensors with the zeros in place, loadable by
`AutoModelForCausalLM.from_pretrained` and any safetensors reader) plus `d2prune_config.json` (the run's config,
the achieved sparsity of every pruned module, the per-block attention choices and the versions used) and a
`README.md` model card. Compressed-tensors sparse formats are deliberately not written (see docs/hub.md).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .configuration import CONFIG_NAME, D2PruneConfig
from .pipeline.finite import nonfinite_parameters
from .report import PruneReport

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_CONFIG_KEY = "d2prune"  # small summary stored in the transformers config.json (round-trips as an attribute)
CARD_NAME = "README.md"
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# a module's zero fraction may differ from the record by this much (float round-off of a fraction, nothing more)
SPARSITY_TOLERANCE = 1e-6

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------------- helpers
def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced a checkpoint."""
    import transformers

    from . import __version__

    versions = {"optimum_d2prune": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import huggingface_hub

        versions["huggingface_hub"] = huggingface_hub.__version__
    except ImportError:  # pragma: no cover - a hard dependency, kept optional for the record only
        pass
    return versions


def measure_sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros of a tensor."""
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of `m` consecutive inputs (per output row) with fewer than `n` zeros."""
    weight = weight.reshape(-1, weight.shape[-1])  # fused experts [E, out, in]: every expert's rows
    rows, cols = weight.shape
    if cols % m:
        return rows * (cols // m + 1)
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(-1)
    return int((zeros < n).sum())


def _module_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The pruned matrix `[out, in]` of a module (GPT-2's Conv1D stores it transposed), or `[E, out, in]` for a
    fused MoE experts parameter (`...experts.gate_up_proj`)."""
    from .architectures.base import matrix

    try:
        module = model.get_submodule(name)
    except AttributeError:
        parent_name, _, param = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            raise KeyError(name) from None
        value = getattr(parent, param, None)
        if not isinstance(value, torch.Tensor) or value.dim() != 3:
            raise KeyError(name) from None
        return (value.transpose(1, 2) if getattr(parent, "is_transposed", False) else value).detach()
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise KeyError(name)
    return matrix(module).detach()


def _is_gguf_quantization(quantization_config: Any) -> bool:
    if quantization_config is None:
        return False
    method = (
        quantization_config.get("quant_method")
        if isinstance(quantization_config, Mapping)
        else getattr(quantization_config, "quant_method", None)
    )
    return str(getattr(method, "value", method)).lower() == "gguf"


@contextmanager
def _plain_checkpoint_config(model: nn.Module, summary: dict[str, Any]) -> Iterator[None]:
    """Temporarily add the `d2prune` summary to `model.config` and drop a GGUF `quantization_config` (the weights
    are dequantized in memory: the checkpoint is a plain one). The user's model is restored afterwards."""
    config = model.config
    missing = object()
    saved = {name: getattr(config, name, missing) for name in (MODEL_CONFIG_KEY, "quantization_config")}
    saved_quantizer = getattr(model, "hf_quantizer", missing)
    try:
        setattr(config, MODEL_CONFIG_KEY, summary)
        if _is_gguf_quantization(saved["quantization_config"]):
            if "quantization_config" in config.__dict__:
                delattr(config, "quantization_config")
            else:
                config.quantization_config = None
            if saved_quantizer is not missing:
                model.hf_quantizer = None
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                if name in config.__dict__:
                    delattr(config, name)
            else:
                setattr(config, name, value)
        if saved_quantizer is not missing:
            model.hf_quantizer = saved_quantizer


def _prepare_output_dir(save_dir: Path, overwrite: bool) -> None:
    if save_dir.exists() and not save_dir.is_dir():
        raise FileExistsError(f"{save_dir} exists and is not a directory: choose another `save_dir`.")
    if save_dir.is_dir() and any(save_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{save_dir} exists and is not empty: choose another output directory or pass `overwrite=True` "
            "(`--overwrite` on the command line) to replace it."
        )


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the platform or
    filesystem cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (musl < 1.2.5, old glibc)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(a), None, os.fspath(b))


def _recover_interrupted_swap(save_dir: Path) -> None:
    """A save killed between the two renames of the fallback left `save_dir` missing and the old folder aside:
    put the old folder back (the interrupted save never happened)."""
    if save_dir.exists():
        return
    for old in sorted(save_dir.parent.glob(f".{save_dir.name}.old-*")):
        logger.warning("Restoring %s from %s (a save to it was interrupted).", save_dir, old)
        os.rename(old, save_dir)
        return


@contextmanager
def atomic_directory(save_dir: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `save_dir`; on success it replaces `save_dir` in one atomic step.

    An existing non-empty `save_dir` is refused unless `overwrite=True`; on error nothing at `save_dir` changes,
    and a process killed at any point leaves either the old folder or the new one at `save_dir`, never a mix
    (an atomic exchange where the filesystem has one, else two renames repaired by the next save).
    A failed write (full disk, file size limit) raises an `OSError` naming `save_dir`.
    """
    save_dir = Path(save_dir).expanduser().absolute()
    _recover_interrupted_swap(save_dir)
    _prepare_output_dir(save_dir, overwrite)
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = save_dir.parent / f".{save_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(mode=0o777)  # the umask applies, unlike mkdtemp's 0o700: the result reads like any folder
    try:
        try:
            yield tmp
        except Exception as err:
            if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":  # a write failed
                raise OSError(getattr(err, "errno", None) or errno.EIO,
                              f"Could not write the checkpoint for {save_dir} ({type(err).__name__}: {err}); "
                              f"nothing at {save_dir} was changed. Check the free space and file size limits of "
                              f"{save_dir.parent}.") from err
            raise
        _prepare_output_dir(save_dir, overwrite)  # something may have appeared meanwhile
        if save_dir.exists() and _exchange(tmp, save_dir):
            return  # `tmp` now holds the old folder: removed below
        old = None
        if save_dir.exists():
            old = save_dir.parent / f".{save_dir.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(save_dir, old)
        try:
            os.rename(tmp, save_dir)
        except OSError:
            if old is not None:
                os.rename(old, save_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ base model info
def base_model_info(model: nn.Module, base_model: Optional[str] = None) -> dict[str, Optional[str]]:
    """`{"base_model": hub id or None, "license": ...}` of the model that was pruned: the local folder it came from
    (its card, or the metadata of its GGUF file), else the Hub card of `base_model` / a Hub id in
    `config._name_or_path` (skipped quietly when offline)."""
    name = getattr(model.config, "_name_or_path", None) or ""
    info: dict[str, Optional[str]] = {"base_model": None, "license": None}
    path = Path(name) if name else None
    if path is not None and path.is_dir():
        card = path / CARD_NAME
        if card.is_file():
            try:
                from huggingface_hub import ModelCard

                data = ModelCard.load(card).data
                info["license"] = data.license
                info["base_model"] = data.base_model if isinstance(data.base_model, str) else None
            except Exception as err:  # a malformed card only costs us the inherited metadata
                logger.warning("Could not read the model card %s (%s); license not inherited.", card, err)
        for gguf in sorted(path.glob("*.gguf"))[:1]:
            info.update({k: v for k, v in _gguf_info(gguf).items() if v and not info.get(k)})
    elif name and _REPO_ID_RE.match(name):
        info["base_model"] = name
    if base_model:
        info["base_model"] = base_model
    if info["license"] is None and info["base_model"] and _REPO_ID_RE.match(info["base_model"]):
        from .connectivity import hub_offline_reason

        offline = hub_offline_reason()
        if offline is not None:  # don't spend transformers' minute of retries on a card we cannot get
            logger.info("License of %s not inherited (%s).", info["base_model"], offline)
            return info
        try:
            from huggingface_hub import ModelCard

            info["license"] = ModelCard.load(info["base_model"]).data.license
        except Exception as err:  # offline or private: the card is still written, without the license
            logger.info("License of %s not inherited (%s: %s).", info["base_model"], type(err).__name__, err)
    return info


def _gguf_info(path: Path) -> dict[str, Optional[str]]:
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
    except Exception as err:
        logger.info("Could not read GGUF metadata of %s (%s).", path, err)
        return {}

    def get(key: str) -> Optional[str]:
        field = fields.get(key)
        try:
            return str(field.contents()) if field is not None else None
        except Exception:
            return None

    base_model = None
    for key in ("general.source.repo_url", "general.base_model.0.repo_url"):
        url = get(key)
        if url and "huggingface.co/" in url:
            base_model = url.rstrip("/").split("huggingface.co/")[-1]
            break
    return {"base_model": base_model, "license": get("general.license")}


# ------------------------------------------------------------------------------------------------------ save
def build_record(
    model: nn.Module,
    config: D2PruneConfig,
    report: Optional[PruneReport] = None,
    calibration: Optional[dict[str, Any]] = None,
    evaluation: Optional[dict[str, Any]] = None,
    command: Optional[str] = None,
    base: Optional[dict[str, Optional[str]]] = None,
) -> dict[str, Any]:
    """The content of `d2prune_config.json` for `model` as it is now (sparsity measured on its weights)."""
    if report is not None and report.layers:
        modules = list(report.sparsity_by_module())
    else:  # no report: the matrices the config targets in this model
        modules = _planned_modules(model, config)
    sparsity = {name: measure_sparsity(_module_weight(model, name)) for name in modules}
    if report is not None:
        for name, recorded in report.sparsity_by_module().items():
            if abs(recorded - sparsity[name]) > SPARSITY_TOLERANCE:
                logger.warning("%s: sparsity %.6f now, %.6f right after pruning: the weights were changed since.",
                               name, sparsity[name], recorded)
    total = sum(_module_weight(model, n).numel() for n in modules)
    zeros = sum(sparsity[n] * _module_weight(model, n).numel() for n in modules)
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "mask_structure": config.mask_structure,
        "sparsity": sparsity,
        "total_sparsity": zeros / total if total else 0.0,
        "attention": [
            {"block": a.block, "chosen": a.chosen, "strategy": a.strategy} for a in (report.attention if report else [])
        ],
        "calibration": calibration or {},
        "evaluation": evaluation or {},
        "command": command,
        "base_model": (base or {}).get("base_model"),
        "versions": library_versions(),
    }
    if report is not None:
        record["report"] = {"seconds": report.seconds, "global_search": report.global_search,
                            "global_metric": report.global_metric,
                            "errors": {r.name: r.error for r in report.layers}}
    return record


def _planned_modules(model: nn.Module, config: D2PruneConfig) -> list[str]:
    from .architectures import get_adapter
    from .pipeline.engine import PruningEngine

    plan = PruningEngine(config, get_adapter(model)).plan(model)
    return list(dict.fromkeys(t.record_name for t in plan.targets()))


def save_pruned(
    model: nn.Module,
    save_dir: PathLike,
    config: D2PruneConfig,
    report: Optional[PruneReport] = None,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    base_model: Optional[str] = None,
    calibration: Optional[dict[str, Any]] = None,
    evaluation: Optional[dict[str, Any]] = None,
    command: Optional[str] = None,
    extra_files: Optional[dict[str, Union[str, bytes]]] = None,
    max_shard_size: Union[int, str] = "5GB",
) -> Path:
    """Write a pruned model as a standard checkpoint plus `d2prune_config.json` and a model card, atomically.

    Args:
        model: the pruned transformers model (`save_pretrained` must work on it).
        save_dir: output folder; refused if it exists and is not empty, unless `overwrite=True`.
        config: the `D2PruneConfig` of the run.
        report: the run's `PruneReport` (names the pruned modules and the attention choices).
        tokenizer: saved alongside when given.
        base_model: Hub id of the original model for the card (default: inferred from the model when possible).
        calibration: what the model was calibrated on, e.g. `{"source": "c4", "num_samples": 128, "seq_len": 2048}`.
        evaluation: metric name -> value (or -> `{"dense": ..., "pruned": ...}`), shown as a table in the card.
        command: the command line or code that produced the model (recorded verbatim).
        extra_files: more files (relative name -> content) written into the folder, e.g. a report.

    Returns:
        The absolute path of the written folder.

    Example:
    ```python
    >>> pruner = D2Pruner(D2PruneConfig(sparsity=0.5))
    >>> model = pruner.prune(model, calib)
    >>> pruner.save(model, "smollm2-d2prune-50", tokenizer=tokenizer)
    ```
    """
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise TypeError(f"`model` must be a transformers model with `save_pretrained`, got {type(model).__name__}.")
    if not isinstance(config, D2PruneConfig):
        raise TypeError(f"`config` must be a D2PruneConfig, got {type(config).__name__}.")
    for name in extra_files or {}:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"`extra_files` names must be relative paths inside the folder, got {name!r}.")
    quantization = getattr(model.config, "quantization_config", None)
    if _is_gguf_quantization(quantization) and not (
        quantization.get("dequantize") if isinstance(quantization, Mapping) else getattr(quantization, "dequantize", True)
    ):
        raise ValueError("The model still holds packed GGUF weights: load it with "
                         "`quantization_config=GgufConfig(dequantize=True)` (as `load_causal_lm` does) before pruning.")
    nonfinite = nonfinite_parameters(model)
    if nonfinite:  # never write a NaN model (e.g. modules left unpruned with `on_nonfinite="skip"`)
        raise ValueError(f"The model holds NaN or Inf in {len(nonfinite)} tensor(s) (e.g. `{nonfinite[0]}`): "
                         "it is not saved. Fix or reload those weights first.")
    save_dir = Path(save_dir).expanduser().absolute()
    _prepare_output_dir(save_dir, overwrite)  # fail before any work
    base = base_model_info(model, base_model)
    record = build_record(model, config, report, calibration, evaluation, command, base)
    summary = {"method": config.method, "mask_structure": config.mask_structure,
               "sparsity": round(record["total_sparsity"], 6), "config_file": CONFIG_NAME,
               "version": record["versions"]["optimum_d2prune"]}
    from tqdm.auto import tqdm

    from .modelcard import make_model_card

    with atomic_directory(save_dir, overwrite) as tmp, tqdm(total=3, desc=f"saving {save_dir.name}", unit="step") as bar:
        with _plain_checkpoint_config(model, summary):
            model.save_pretrained(tmp, max_shard_size=max_shard_size)  # safetensors
        bar.update()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            (target.write_bytes if isinstance(content, bytes) else target.write_text)(content)
        bar.update()
        make_model_card(record, license=base.get("license"), extra_files=sorted(extra_files or {})).save(tmp / CARD_NAME)
        bar.update()
    logger.info("Saved the pruned model (%.2f%% zeros in %d modules) to %s.", 100 * record["total_sparsity"],
                len(record["sparsity"]), save_dir)
    return save_dir


def record_evaluation(
    save_dir: PathLike, evaluation: dict[str, Any], extra_files: Optional[dict[str, Union[str, bytes]]] = None
) -> None:
    """Add evaluation results to a folder written by `save_pruned` (d2prune_config.json, the card, report files).

    Evaluation runs after the model is safely on disk; each file is replaced atomically, so an interruption leaves
    the earlier version of that file, never a torn one.
    """
    save_dir = Path(save_dir)
    record = json.loads((save_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    record["evaluation"] = evaluation
    from huggingface_hub import ModelCard

    from .modelcard import make_model_card

    license = ModelCard.load(save_dir / CARD_NAME).data.license if (save_dir / CARD_NAME).is_file() else None
    files: dict[str, Union[str, bytes]] = {CONFIG_NAME: json.dumps(record, indent=2, sort_keys=True) + "\n"}
    files.update(extra_files or {})
    files[CARD_NAME] = str(make_model_card(record, license=license, extra_files=sorted(extra_files or {})))
    for name, content in files.items():
        target = save_dir / name
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        (tmp.write_bytes if isinstance(content, bytes) else tmp.write_text)(content)
        os.replace(tmp, target)


# ------------------------------------------------------------------------------------------------------ load
def read_record(path_or_hub_id: PathLike, revision: Optional[str] = None, token: Optional[str] = None) -> dict:
    """The `d2prune_config.json` of a local folder or Hub repository."""
    path = Path(os.fspath(path_or_hub_id)).expanduser()
    if path.is_dir():
        file = path / CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: it is not a checkpoint saved by optimum-d2prune "
                                    "(`D2Pruner.save` or `optimum-cli d2prune`).")
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = hf_hub_download(os.fspath(path_or_hub_id), CONFIG_NAME, revision=revision, token=token)
        except Exception as err:
            raise FileNotFoundError(f"Could not get {CONFIG_NAME} of {os.fspath(path_or_hub_id)!r}: it is neither a "
                                    f"local folder nor a reachable Hub repository ({type(err).__name__}: {err}).") from err
    with open(file, encoding="utf-8") as f:
        record = json.load(f)
    if not isinstance(record, dict) or "config" not in record or "sparsity" not in record:
        raise ValueError(f"{file} is not a d2prune checkpoint record (keys `config` and `sparsity` missing).")
    return record


def verify_sparsity(model: nn.Module, record: dict[str, Any]) -> None:
    """Check that every recorded module kept its zeros (and its N:M pattern); raise `ValueError` listing those
    that did not (e.g. a checkpoint loaded into the wrong class, or weights re-initialised silently)."""
    config = D2PruneConfig.from_dict(record["config"])
    pattern = config.pattern
    problems = []
    for name, expected in record["sparsity"].items():
        try:
            weight = _module_weight(model, name)
        except KeyError:
            problems.append(f"{name}: module not found in the loaded model")
            continue
        got = measure_sparsity(weight)
        if abs(got - expected) > SPARSITY_TOLERANCE:
            problems.append(f"{name}: {got:.4%} zeros, {expected:.4%} recorded")
        elif pattern.is_nm and (bad := nm_violations(weight, pattern.n, pattern.m)):
            problems.append(f"{name}: {bad} groups of {pattern.m} break the {pattern.structure} pattern")
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(
            f"The loaded model does not match its {CONFIG_NAME} ({len(problems)} of {len(record['sparsity'])} "
            f"modules):\n  {shown}\nLoad it with the class and dtype it was saved with (a lower precision can turn "
            "small weights into zeros), or pass `verify=False` to skip this check."
        )


def load_pruned(
    path_or_hub_id: PathLike,
    *,
    model_class: Any = None,
    verify: bool = True,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    **from_pretrained_kwargs: Any,
) -> tuple[nn.Module, D2PruneConfig]:
    """Load a checkpoint written by `D2Pruner.save` / `optimum-cli d2prune` and check its sparsity survived.

    Args:
        path_or_hub_id: a local folder or a Hub repository id.
        model_class: the transformers class (default `AutoModelForCausalLM`).
        verify: compare every recorded module's zero fraction (and N:M pattern) with the loaded weights.
        **from_pretrained_kwargs: passed to `from_pretrained` (e.g. `dtype`, `device_map`).

    Returns:
        `(model, config)`: the loaded model and the `D2PruneConfig` it was pruned with.

    Example:
    ```python
    >>> from optimum_d2prune import load_pruned
    >>> model, config = load_pruned("smollm2-d2prune-50")
    ```
    """
    record = read_record(path_or_hub_id, revision=revision, token=token)
    config = D2PruneConfig.from_dict(record["config"])
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    kwargs = dict(from_pretrained_kwargs)
    if revision is not None:
        kwargs["revision"] = revision
    if token is not None:
        kwargs["token"] = token
    model = model_class.from_pretrained(os.fspath(path_or_hub_id), **kwargs)
    if verify:
        verify_sparsity(model, record)
    return model, config


# ------------------------------------------------------------------------------------------------------ push
def checkpoint_files(save_dir: PathLike) -> list[str]:
    """Relative paths of the files a checkpoint folder holds (what `push_to_hub` uploads), sorted."""
    root = Path(save_dir)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def push_to_hub(
    source: Union[PathLike, nn.Module],
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
    revision: Optional[str] = None,
    **save_kwargs: Any,
) -> str:
    """Upload a saved checkpoint folder (or save a pruned model first) to the Hugging Face Hub.

    Args:
        source: a folder written by `save_pruned`, or a pruned model (then `config=`, `report=`, `tokenizer=`
            ... are passed to `save_pruned` through `save_kwargs` and a temporary folder is uploaded).
        repo_id: `"user/name"`; the repository is created if needed.
        private: create the repository as private.
        token: Hub token; default: the one from `HF_TOKEN` or `huggingface-cli login`.

    Returns:
        The URL of the commit.
    """
    if not isinstance(repo_id, str) or not _REPO_ID_RE.match(repo_id):
        raise ValueError(f'`repo_id` must look like "user/name", got {repo_id!r}.')
    if isinstance(source, nn.Module):
        if "config" not in save_kwargs:
            raise ValueError("Pushing a model needs its `config=` (the D2PruneConfig), or push a saved folder.")
        with tempfile.TemporaryDirectory(prefix="d2prune-push-") as tmp:
            folder = save_pruned(source, Path(tmp) / "checkpoint", **save_kwargs)
            return push_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message,
                               revision=revision)
    if save_kwargs:
        raise ValueError(f"{sorted(save_kwargs)} only apply when pushing a model, not a saved folder.")
    folder = Path(source)
    read_record(folder)  # raises when the folder is not a d2prune checkpoint
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the model with `D2Pruner.save` first.")
    files = checkpoint_files(folder)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    logger.info("Uploading %d files from %s to %s.", len(files), folder, repo_id)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        allow_patterns=files,
        commit_message=commit_message or "Upload model pruned with optimum-d2prune",
    )
    return str(getattr(commit, "commit_url", commit))
