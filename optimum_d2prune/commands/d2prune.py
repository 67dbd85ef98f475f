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
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from ..io.atomic import check_output_dir
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
    from .arguments import add_arguments

    return add_arguments(parser)


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
    """Refuse an output folder a save may not replace (`check_output_dir`) or cannot write (the save writes a
    sibling folder of the link's target, then renames it)."""
    out = check_output_dir(out, overwrite, protected=(model,))
    parent = out.parent
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
    from .arguments import config_from_args

    args.calibration, args.eval = as_local_path(args.calibration), as_local_path(args.eval)
    _check_output_dir(Path(args.output_dir).expanduser(), args.overwrite, args.model)
    config = config_from_args(args)
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
    _check_generation_cost(args, run_device(config))
    tasks = _zero_shot_tasks(args.zero_shot)
    if tasks:
        from ..evaluation.zeroshot import check_tasks

        check_tasks(tasks, args.zero_shot_data)
    elif args.zero_shot_data is not None or args.zero_shot_limit is not None:
        raise ValueError("--zero-shot-data / --zero-shot-limit need --zero-shot.")
    if args.push_to_hub is not None:
        check_push_access(args.push_to_hub, private=args.private)
    if args.private and args.push_to_hub is None:
        raise ValueError("--private needs --push-to-hub.")
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


def _check_generation_cost(args: argparse.Namespace, device: str) -> None:
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
    from ..memory.estimate import MemoryBudgetError, RunShape, check_fits

    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        est = check_fits(model.config, RunShape.of(config, args.num_samples, args.seq_len), device, model_bytes,
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
    from ..io import new_run_id, push_to_hub, record_evaluation, save_pruned
    from ..pruner import D2Pruner

    device = run_device(config)
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
    run_id = new_run_id()  # record_evaluation writes only into the folder this save made
    out = save_pruned(model, args.output_dir, config, pruner.report, tokenizer, overwrite=args.overwrite,
                      base_model=source.hub_id, calibration=calibration, evaluation=evaluation, command=command,
                      extra_files=_report_files(args, config, pruner.report, evaluation, None, str(source)),
                      run_id=run_id)
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
                          _report_files(args, config, pruner.report, evaluation, zero_shot, str(source)),
                          run_id=run_id, sizes=_evaluation_sizes(args, eval_name, zero_shot))
    url = push_to_hub(out, args.push_to_hub, private=args.private) if args.push_to_hub else None
    print(summary_table(pruner.report, evaluation, out, url))
    print(summary_line(pruner.report, evaluation.get(eval_name), eval_name, out, time.perf_counter() - start))
    return out


def _evaluation_sizes(args: argparse.Namespace, eval_name: str, zero_shot) -> dict[str, dict[str, int]]:
    """How much data each recorded metric rests on (for the model card)."""
    sizes: dict[str, dict[str, int]] = {}
    if args.eval == "self":
        sizes[eval_name] = {"windows": args.eval_samples, "tokens": args.eval_samples * args.eval_seq_len}
    if zero_shot is not None:
        for task, count in zero_shot.samples.items():
            sizes[f"{task} ({zero_shot.metric_of(task)})"] = {"examples": int(count)}
    return sizes


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
    if not args.report:
        return {}
    from ..report.html import render_report

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
        rows.append(("projection left un-updated (blocks)",
                     ", ".join(f"{p}: {n}" for p, n in report.unupdated_counts().items())))
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
