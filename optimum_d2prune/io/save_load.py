"""Pruned checkpoints as ordinary Hugging Face artifacts: save, add evaluation results, read, verify, load.

A checkpoint is a plain `save_pretrained` folder (dense safetensors with the zeros in place, loadable by
`AutoModelForCausalLM.from_pretrained` and any safetensors reader) plus `d2prune_config.json` (see `record.py`) and
a `README.md` model card. Compressed-tensors sparse formats are deliberately not written (see docs/hub.md).

Loading never hands back a model that silently differs from what was saved: tensors missing from the files (which
transformers would fill with random values), unexpected tensors, a config.json that does not match the weights,
or modules that lost their zeros are refused, each in one message naming the folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..configuration import CONFIG_NAME, D2PruneConfig
from ..errors import CheckpointError, InputError
from ..pipeline.finite import nonfinite_parameters
from ..report import PruneReport
from .atomic import atomic_directory, check_output_dir
from .gguf import is_gguf_quantization
from .record import (
    SPARSITY_TOLERANCE,
    build_record,
    config_from_record,
    measure_sparsity,
    module_weight,
    nm_violations,
    parse_record,
    pattern_of,
    read_record_file,
    validate_record,
)

logger = logging.getLogger(__name__)

MODEL_CONFIG_KEY = "d2prune"  # small summary stored in the transformers config.json (round-trips as an attribute)
CARD_NAME = "README.md"

PathLike = Union[str, os.PathLike]


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
        if is_gguf_quantization(saved["quantization_config"]):
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


def _model_source(model: nn.Module) -> tuple[str, ...]:
    """The local folder or file the model was loaded from (never to be replaced by a save)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return (name,) if name and Path(name).expanduser().exists() else ()


def _check_saveable(model: nn.Module, config: D2PruneConfig, extra_files: Optional[Mapping[str, Any]]) -> None:
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise TypeError(f"`model` must be a transformers model with `save_pretrained`, got {type(model).__name__}.")
    if not isinstance(config, D2PruneConfig):
        raise TypeError(f"`config` must be a D2PruneConfig, got {type(config).__name__}.")
    for name in extra_files or {}:
        if Path(name).is_absolute() or ".." in Path(name).parts or not Path(name).parts:
            raise InputError(f"`extra_files` names must be relative paths inside the folder, got {name!r}.")
    quantization = getattr(model.config, "quantization_config", None)
    dequantized = (quantization.get("dequantize") if isinstance(quantization, Mapping)
                   else getattr(quantization, "dequantize", True))
    if is_gguf_quantization(quantization) and not dequantized:
        raise InputError("The model still holds packed GGUF weights: load it with "
                         "`quantization_config=GgufConfig(dequantize=True)` (as `load_causal_lm` does) before "
                         "pruning.")
    nonfinite = nonfinite_parameters(model)
    if nonfinite:  # never write a NaN model (e.g. modules left unpruned with `on_nonfinite="skip"`)
        raise InputError(f"The model holds NaN or Inf in {len(nonfinite)} tensor(s) (e.g. `{nonfinite[0]}`): "
                         "it is not saved. Fix or reload those weights first.")


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
    run_id: Optional[str] = None,
) -> Path:
    """Write a pruned model as a standard checkpoint plus `d2prune_config.json` and a model card, atomically.

    Args:
        model: the pruned transformers model (`save_pretrained` must work on it).
        save_dir: output folder (a symbolic link is written through to its target). Refused when it exists and
            is not empty, unless `overwrite=True`, which replaces only an earlier output of optimum-d2prune (see
            `check_output_dir`); never the folder the model was loaded from, nor a folder containing it.
        config: the `D2PruneConfig` of the run.
        report: the run's `PruneReport` (names the pruned modules and the attention choices).
        tokenizer: saved alongside when given.
        base_model: Hub id of the original model for the card (default: inferred from the model when possible).
        calibration: what the model was calibrated on, e.g. `{"source": "c4", "num_samples": 128, "seq_len": 2048}`.
        evaluation: metric name -> value (or -> `{"dense": ..., "pruned": ...}`), shown as a table in the card.
        command: the command line or code that produced the model (recorded verbatim).
        extra_files: more files (relative name -> content) written into the folder, e.g. a report.
        run_id: the id recorded for this save (default: a new one); pass the same id to `record_evaluation`.

    Returns:
        The absolute path of the written folder (as given, not resolved through a link).

    Example:
    ```python
    >>> pruner = D2Pruner(D2PruneConfig(sparsity=0.5))
    >>> model = pruner.prune(model, calib)
    >>> pruner.save(model, "smollm2-d2prune-50", tokenizer=tokenizer)
    ```
    """
    _check_saveable(model, config, extra_files)
    protected = _model_source(model)
    save_dir = Path(save_dir).expanduser().absolute()
    check_output_dir(save_dir, overwrite, protected)  # fail before any work
    from .hub import base_model_info
    from .modelcard import make_model_card

    base = base_model_info(model, base_model)
    gguf = base.get("gguf")
    source = {"gguf_file": gguf.file, "gguf_quantization": gguf.quantization} if gguf is not None else None
    record = build_record(model, config, report, calibration=calibration, evaluation=evaluation, command=command,
                          base_model=base.get("base_model"), license=base.get("license"), source=source,
                          run_id=run_id)
    summary = {"method": config.method, "mask_structure": config.mask_structure,
               "sparsity": round(record["total_sparsity"], 6), "config_file": CONFIG_NAME,
               "version": record["versions"]["optimum_d2prune"]}
    from tqdm.auto import tqdm

    with atomic_directory(save_dir, overwrite, protected) as tmp, \
            tqdm(total=3, desc=f"saving {save_dir.name}", unit="step") as bar:
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
        make_model_card(record, extra_files=sorted(extra_files or {})).save(tmp / CARD_NAME)
        bar.update()
    logger.info("Saved the pruned model (%.2f%% zeros in %d modules) to %s (run %s).", 100 * record["total_sparsity"],
                len(record["sparsity"]), save_dir, record["run_id"])
    return save_dir


# ------------------------------------------------------------------------------------------ adding evaluation
def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _replace_at(dir_fd: int, name: str, content: Union[str, bytes]) -> None:
    """Write `name` (relative, may hold folders) inside the folder open as `dir_fd`, replacing it atomically."""
    *folders, base = Path(name).parts
    fds = [dir_fd]
    try:
        for folder in folders:
            try:
                os.mkdir(folder, dir_fd=fds[-1])
            except FileExistsError:
                pass
            fds.append(os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0), dir_fd=fds[-1]))
        tmp = f".{base}.tmp-{os.getpid()}"
        data = content.encode("utf-8") if isinstance(content, str) else content
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666, dir_fd=fds[-1])
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, base, src_dir_fd=fds[-1], dst_dir_fd=fds[-1])
    finally:
        for fd in fds[1:]:
            os.close(fd)


def record_evaluation(
    save_dir: PathLike,
    evaluation: dict[str, Any],
    extra_files: Optional[dict[str, Union[str, bytes]]] = None,
    *,
    run_id: str,
    sizes: Optional[dict[str, dict[str, int]]] = None,
) -> None:
    """Add evaluation results to a folder written by `save_pruned` (d2prune_config.json, the card, report files).

    `run_id` is the id of the save that wrote the folder (`save_pruned(..., run_id=...)`): when the folder's record
    carries another id, another run replaced the folder meanwhile and nothing is written (`CheckpointError`).
    The folder is opened once and every file is written through that handle, so a folder swapped in by another
    save while this runs is never written. `sizes`: metric name -> how much data it rests on, e.g.
    `{"windows": 32, "tokens": 16384}` or `{"examples": 500}` (stated in the card).
    Each file is replaced atomically: an interruption leaves the earlier version of that file, never a torn one.
    """
    from .modelcard import make_model_card

    save_dir = Path(save_dir)
    for name in extra_files or {}:
        if Path(name).is_absolute() or ".." in Path(name).parts or not Path(name).parts:
            raise InputError(f"`extra_files` names must be relative paths inside the folder, got {name!r}.")
    try:
        dir_fd = os.open(save_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:
        raise CheckpointError(f"{save_dir} cannot be opened ({err.strerror}): it is not the folder `save_pruned` "
                              "wrote.") from None
    try:
        try:
            text = _read_at(dir_fd, CONFIG_NAME).decode("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{save_dir / CONFIG_NAME} cannot be read ({err}): it is not a folder written by "
                                  "`save_pruned`.") from None
        record = parse_record(text, save_dir / CONFIG_NAME)
        if record.get("run_id") != run_id:
            raise CheckpointError(
                f"{save_dir} now holds the output of another save (run {record.get('run_id')}), not the one of this "
                f"run ({run_id}): another run replaced it. The evaluation of this run is not written there; its "
                "model is gone, so run it again into a folder no other run uses.")
        record["evaluation"] = evaluation
        if sizes:
            record["evaluation_sizes"] = sizes
        if record.get("license") is None and "license" not in record:  # a folder from a release without it
            record["license"] = _card_license(save_dir)
        files: dict[str, Union[str, bytes]] = {CONFIG_NAME: json.dumps(record, indent=2, sort_keys=True) + "\n"}
        files.update(extra_files or {})
        files[CARD_NAME] = str(make_model_card(record, extra_files=sorted(extra_files or {})))
        for name, content in files.items():
            _replace_at(dir_fd, name, content)
    finally:
        os.close(dir_fd)


def _card_license(save_dir: Path) -> Optional[str]:
    card = save_dir / CARD_NAME
    if not card.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(card).data.license
    except Exception:  # noqa: BLE001 - an unreadable card only costs the license line
        return None


# ------------------------------------------------------------------------------------------------------ load
def _record_file(path_or_hub_id: PathLike, revision: Optional[str], token: Optional[str]) -> Path:
    path = Path(os.fspath(path_or_hub_id)).expanduser()
    if path.is_dir():
        file = path / CONFIG_NAME
        if not file.is_file():
            raise CheckpointError(f"{path} has no {CONFIG_NAME}: it is not a checkpoint saved by optimum-d2prune "
                                  "(`D2Pruner.save` or `optimum-cli d2prune`).")
        return file
    from huggingface_hub import hf_hub_download

    from .hub import is_repo_id

    if not is_repo_id(os.fspath(path_or_hub_id)):
        raise CheckpointError(f"{os.fspath(path_or_hub_id)!r} is neither a local folder nor a Hub repository id.")
    try:
        return Path(hf_hub_download(os.fspath(path_or_hub_id), CONFIG_NAME, revision=revision, token=token))
    except Exception as err:  # noqa: BLE001 - not found, gated, offline: one line naming the source
        raise CheckpointError(f"Could not get {CONFIG_NAME} of {os.fspath(path_or_hub_id)!r}: it is neither a "
                              f"local folder nor a reachable Hub repository ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}).") from None


def read_record(path_or_hub_id: PathLike, revision: Optional[str] = None, token: Optional[str] = None) -> dict:
    """The validated `d2prune_config.json` of a local folder or Hub repository (`CheckpointError` in one line
    naming the file when it is missing, not JSON, malformed, or from a newer release)."""
    return read_record_file(_record_file(path_or_hub_id, revision, token))


def verify_sparsity(model: nn.Module, record: dict[str, Any]) -> None:
    """Check that every recorded module kept its zeros (and its N:M pattern); raise `CheckpointError` listing those
    that did not (e.g. a checkpoint loaded into the wrong class, or weights re-initialised silently)."""
    validate_record(record)
    pattern = pattern_of(record)
    problems = []
    for name, expected in record["sparsity"].items():
        try:
            weight = module_weight(model, name)
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
        raise CheckpointError(
            f"The loaded model does not match its {CONFIG_NAME} ({len(problems)} of {len(record['sparsity'])} "
            f"modules):\n  {shown}\nLoad it with the class and dtype it was saved with (a lower precision can turn "
            "small weights into zeros), or pass `verify=False` to skip this check."
        )


def _stored_values(folder: Path) -> Optional[int]:
    """How many values the safetensors files of `folder` hold (from their headers), None when there are none."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    count = 1
                    for dim in shape:
                        count *= int(dim)
                    total += count
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file: say which
            raise CheckpointError(f"{file} is not a readable safetensors file ({type(err).__name__}: {err}): the "
                                  "checkpoint is damaged; save or download it again.") from None
    return total


def _check_config_matches_weights(folder: Path, model_class: Any, kwargs: dict[str, Any]) -> None:
    """Refuse, before allocating anything, a config.json that describes more parameters than the files hold
    (transformers would create the difference with random values)."""
    stored = _stored_values(folder)
    if stored is None:
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, **{k: v for k, v in kwargs.items() if k == "trust_remote_code"})
    except Exception as err:  # noqa: BLE001 - a broken config.json, in one line
        raise CheckpointError(f"{folder / 'config.json'} cannot be read as a transformers config "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).") from None
    if getattr(config, "quantization_config", None) is not None:
        return  # packed weights hold fewer values than parameters
    try:
        with torch.device("meta"):
            skeleton = (model_class.from_config(config) if hasattr(model_class, "from_config")
                        else model_class(config))
    except Exception as err:  # noqa: BLE001 - no cheap skeleton: the loading report below still decides
        logger.debug("No meta-device skeleton of %s (%s); relying on the loading report.", folder, err)
        return
    expected = sum(p.numel() for p in skeleton.parameters())
    if expected > stored:
        raise CheckpointError(
            f"{folder} does not load as saved: its config.json describes a model of {expected:,} parameters, the "
            f"safetensors files hold {stored:,} values (tensors are missing from the files, or config.json was "
            "changed, e.g. its num_hidden_layers); transformers would fill the difference with random weights. "
            "Restore the folder as it was saved (or download it again).")


def _check_loading_info(info: dict[str, Any], source: str) -> None:
    """Refuse a load in which transformers initialised, dropped or reshaped tensors."""
    problems = []
    for key, what in (("missing_keys", "missing from the checkpoint (initialised at random)"),
                      ("unexpected_keys", "in the checkpoint but not in the model"),
                      ("mismatched_keys", "of a different shape in the checkpoint")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or [])
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} tensor(s) {what}: {shown}")
    if info.get("error_msgs"):
        problems.append("; ".join(str(m) for m in info["error_msgs"])[:300])
    if problems:
        raise CheckpointError(f"{source} does not load as saved: " + "; ".join(problems) + ". The files or the "
                              "config.json were changed after saving, or `model_class` is not the class it was saved "
                              "with; restore the folder (or download it again).")


def load_pruned(
    path_or_hub_id: PathLike,
    *,
    model_class: Any = None,
    verify: bool = True,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    **from_pretrained_kwargs: Any,
) -> tuple[nn.Module, Optional[D2PruneConfig]]:
    """Load a checkpoint written by `D2Pruner.save` / `optimum-cli d2prune` and check that it loads as saved.

    Refused (`CheckpointError`, one message naming the folder): a missing, broken or newer-format record; tensors
    missing from the files, unexpected or reshaped; a config.json describing more parameters than the files hold;
    and with `verify=True`, a recorded module whose zero fraction (or N:M pattern) differs in the loaded weights.

    Args:
        path_or_hub_id: a local folder or a Hub repository id.
        model_class: the transformers class (default `AutoModelForCausalLM`).
        verify: compare every recorded module's zero fraction (and N:M pattern) with the loaded weights.
        **from_pretrained_kwargs: passed to `from_pretrained` (e.g. `dtype`, `device_map`).

    Returns:
        `(model, config)`: the loaded model and the `D2PruneConfig` it was pruned with. `config` is None when the
        record names a method not registered in this process (a method defined in the user's own code: import
        that code first to get its config); the model is loaded and verified all the same, with a warning.
        Config fields this version does not know are dropped with a warning.

    Example:
    ```python
    >>> from optimum_d2prune import load_pruned
    >>> model, config = load_pruned("smollm2-d2prune-50")
    ```
    """
    file = _record_file(path_or_hub_id, revision, token)
    record = read_record_file(file)
    config = config_from_record(record, file)
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    kwargs = dict(from_pretrained_kwargs)
    kwargs.pop("output_loading_info", None)
    if revision is not None:
        kwargs["revision"] = revision
    if token is not None:
        kwargs["token"] = token
    folder = file.parent
    _check_config_matches_weights(folder, model_class, kwargs)
    source = os.fspath(path_or_hub_id)
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source} cannot be loaded by transformers ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}).") from None
    _check_loading_info(info, source)
    if verify:
        verify_sparsity(model, record)
    return model, config
