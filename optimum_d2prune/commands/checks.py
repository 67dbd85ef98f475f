"""Everything the command line can refuse before a model loads, and the run's sizes and device."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..errors import ConfigError, InputError
from ..io.atomic import check_output_dir, check_writable
from ..io.hub import check_push_access

logger = logging.getLogger(__name__)

CALIBRATION_HUB = ("c4", "wikitext2", "self")
EVAL_BUILTIN = ("self", "wikitext2", "none")

#: (num_samples, seq_len, held-out evaluation samples) by device type: the paper's size on GPUs, and a size that
#: prunes the embedded SmolLM2-135M in a few minutes on a 2-core CPU (README, "Two commands")
DEFAULT_SIZES = {"cuda": (128, 2048, 32), "cpu": (32, 512, 8)}
#: windows of an --eval file scored by default: all on CUDA (the papers' protocol); on CPU the benchmark protocol's
#: first 32 (WikiText-2 test has 595 windows of 512 tokens: about an hour per evaluation on 2 cores)
DEFAULT_EVAL_WINDOWS = {"cuda": None, "cpu": 32}

def zero_shot_tasks(value: str | None) -> list[str]:
    if not value:
        return []
    if value.strip().lower() in ("paper", "all"):
        from ..evaluation.zeroshot import PAPER_TASKS

        return list(PAPER_TASKS)
    return [t.strip() for t in value.split(",") if t.strip()]


def check_output_folder(out: Path, overwrite: bool, model: str) -> None:
    """Refuse an output folder a save may not replace (`check_output_dir`) or cannot write (the save writes a
    sibling folder of the link's target, then renames it)."""
    out = check_output_dir(out, overwrite, protected=(model,))
    check_writable(out.parent, "--output-dir")


def check_file_source(flag: str, value: str, builtin: tuple[str, ...]) -> None:
    """A local data file exists, is readable and not empty (before anything loads)."""
    if value in builtin:
        return
    path = Path(value).expanduser()
    if not path.is_file():
        raise InputError(f"{flag} {value!r}: no such file. Use {', '.join(builtin)} or an existing .jsonl/.txt file.")
    try:
        with open(path, "rb") as f:
            empty = not any(chunk.strip() for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError as err:
        raise InputError(f"{flag} {value!r}: cannot read it ({err.strerror or err}).") from None
    if empty:
        raise InputError(f"{flag} {value!r} is empty.")


def check_arguments(args: argparse.Namespace):
    """Validate every argument before anything is loaded; returns the `D2PruneConfig` (raises a `D2PruneError`)."""
    from ..calibration import as_local_path
    from .arguments import config_from_args

    args.calibration, args.eval = as_local_path(args.calibration), as_local_path(args.eval)
    check_output_folder(Path(args.output_dir).expanduser(), args.overwrite, args.model)
    config = config_from_args(args)
    for name in ("num_samples", "seq_len", "eval_samples", "eval_seq_len", "eval_max_windows", "zero_shot_limit",
                 "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    for name in ("seq_len", "eval_seq_len"):
        if (getattr(args, name) or 2) < 2:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 2, got {getattr(args, name)}.")
    check_file_source("--calibration", args.calibration, CALIBRATION_HUB)
    check_file_source("--eval", args.eval, EVAL_BUILTIN)
    if args.eval == "none" and (args.eval_samples or args.eval_max_windows or args.eval_seq_len):
        raise ConfigError("--eval-samples / --eval-seq-len / --eval-max-windows need an --eval source.")
    if args.eval_samples is not None and args.eval != "self":
        raise ConfigError("--eval-samples applies to --eval self only (use --eval-max-windows for files).")
    check_generation_cost_of(args, run_device(config))
    tasks = zero_shot_tasks(args.zero_shot)
    if tasks:
        from ..evaluation.zeroshot import check_tasks

        check_tasks(tasks, args.zero_shot_data)
    elif args.zero_shot_data is not None or args.zero_shot_limit is not None:
        raise ConfigError("--zero-shot-data / --zero-shot-limit need --zero-shot.")
    if args.push_to_hub is not None:
        check_push_access(args.push_to_hub, private=args.private)
    if args.private and args.push_to_hub is None:
        raise ConfigError("--private needs --push-to-hub.")
    return config


def run_device(config) -> str:
    """Where this process prunes: `--device`, else this rank's GPU under torchrun (`LOCAL_RANK`), else the first GPU,
    else the CPU. Checked to exist on this machine before anything loads."""
    import torch

    from ..pipeline.checks import check_device

    device = config.runtime.device
    if device is None and torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK")
        device = f"cuda:{int(local)}" if local is not None else "cuda"
    check_device(device)
    return device or "cpu"


def check_generation_cost_of(args: argparse.Namespace, device: str) -> None:
    """Refuse, before anything loads, self-generated text above the cap (tokens, estimated time); --force lifts it."""
    from ..calibration import GenerationJob, check_generation_cost, estimate_parameters

    samples, seq_len, eval_samples = DEFAULT_SIZES["cuda" if device.startswith("cuda") else "cpu"]
    jobs = []
    if args.calibration == "self":
        jobs.append(GenerationJob("--calibration self", args.num_samples or samples, args.seq_len or seq_len,
                                  "--num-samples / --seq-len"))
    if args.eval == "self":
        jobs.append(GenerationJob("--eval self", args.eval_samples or eval_samples,
                                  args.eval_seq_len or args.seq_len or seq_len, "--eval-samples / --eval-seq-len"))
    if jobs:
        check_generation_cost(jobs, device, estimate_parameters(args.model, args.gguf_file), args.force)


def resolve_sizes(args: argparse.Namespace, device: str) -> None:
    """Fill the size options left unset with the defaults of the device type (see `DEFAULT_SIZES`)."""
    samples, seq_len, eval_samples = DEFAULT_SIZES["cuda" if device.startswith("cuda") else "cpu"]
    args.num_samples = args.num_samples or samples
    args.seq_len = args.seq_len or seq_len
    args.eval_seq_len = args.eval_seq_len or args.seq_len
    if args.eval == "self":
        args.eval_samples = args.eval_samples or eval_samples
    elif args.eval != "none" and args.eval_max_windows is None:
        args.eval_max_windows = DEFAULT_EVAL_WINDOWS["cuda" if device.startswith("cuda") else "cpu"]


def check_sources(args: argparse.Namespace, tokenizer):
    """With the tokenizer at hand (cheap), check that each text source is long enough, and reachable if on the Hub;
    returns the resolved (calibration, evaluation) `DataSource`s (None for --eval none)."""
    from ..calibration import DataSource, check_text_source, resolve_chat

    resolve_chat(args.chat_template, tokenizer)  # "on" without a chat template is refused here
    calibration, evaluation = DataSource("self", "self"), None
    if args.calibration != "self":
        calibration = check_text_source(args.calibration, tokenizer, args.seq_len, "calibration", "--calibration",
                                        "--seq-len")
        if calibration.chat and args.chat_template == "off":
            raise InputError(f"--calibration {args.calibration!r} holds `messages` records, which are calibrated on "
                             "through the chat template: drop --chat-template off.")
    if args.eval not in ("self", "none"):
        evaluation = check_text_source(args.eval, tokenizer, args.eval_seq_len, "evaluation", "--eval",
                                       "--eval-seq-len")
    return calibration, evaluation


def check_lengths(args: argparse.Namespace, model_config) -> None:
    """Sequences longer than the model's positions would be refused by the pruner, after generating them."""
    limit = getattr(model_config, "max_position_embeddings", None)
    for flag, value in (("--seq-len", args.seq_len), ("--eval-seq-len", args.eval_seq_len)):
        if limit and value and value > limit:
            raise ConfigError(f"{flag} {value} is longer than the model's max_position_embeddings={limit}: lower it.")


def plan_placement(args: argparse.Namespace, model_config, model_bytes: int | None, config, device: str) -> str:
    """Where the model lives while it is pruned, decided from the memory model before the weights load: "device"
    (it moves to `device`) or "host" (it stays in host memory and each block visits `device` in turn: a model larger
    than the GPU). Refused with the estimate and what would fit when neither does; `--skip-memory-check` starts
    anyway. `model_bytes` None (a Hub model, unknown before it loads) skips the check."""
    from ..memory.estimate import MemoryBudgetError, RunShape, available_bytes, check_fits, estimate

    if model_bytes is None:
        return "device"
    run = RunShape.of(config, args.num_samples, args.seq_len)
    try:
        est = check_fits(model_config, run, device, model_bytes)
        placement = "device"
    except MemoryBudgetError as err:
        if args.skip_memory_check:
            logger.warning("The memory estimate exceeds the free memory of %s; starting anyway (--skip-memory-check).",
                           device)
            return "device"
        est = estimate(model_config, run, device, model_on_device=False)
        if device == "cpu" or est.peak > (available_bytes(device) or 0):
            raise err
        placement = "host"
    except (AttributeError, TypeError) as err:  # not a decoder config the model covers (e.g. a vision model)
        logger.info("No memory estimate for this model: %s", err)
        return "device"
    logger.info("Estimated pruning peak on %s: %.2f GiB%s (%s).", device, est.peak / 2**30,
                " above the model's weights" if placement == "device" else ", the model staying in host memory",
                ", ".join(f"{k} {v / 2**30:.2f}" for k, v in est.phases.items()))
    if placement == "host" and "self" in (args.calibration, args.eval):
        raise ConfigError(
            f"The model ({model_bytes / 2**30:.1f} GiB) does not fit {device} with the pruning peak, so it stays in host "
            "memory and each block visits the GPU in turn; generating text with it there would take hours. Give "
            "calibration data and an evaluation file (or none): --calibration c4 (or a .jsonl/.txt file) --eval none.")
    return placement
