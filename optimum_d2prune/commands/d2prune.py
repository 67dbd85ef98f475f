"""`optimum-cli d2prune` and `python -m optimum_d2prune`: the parser (generated, `arguments.py`), the run
(`run.py`), the final summary, and how errors end a run.

This module is imported every time `optimum-cli` starts (through `optimum/commands/register/register_d2prune.py`):
it must stay light. torch, transformers and the library are imported inside the run.

A run goes: check the arguments (`checks.py`) -> resolve the model and load its tokenizer -> check every data
source against it -> decide where the model lives -> load it -> (dense evaluation) -> calibrate -> prune -> save ->
evaluate -> record the evaluation in the saved folder -> push. Everything that can be refused is refused before the
model loads; the pruned model is on disk before any evaluation of it runs.
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

logger = logging.getLogger(__name__)

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


def summary_table(report, evaluation: dict[str, Any], out: Path, url: Optional[str] = None) -> str:
    """The final table printed by the CLI."""
    from ..structured.report import ShrinkReport

    if isinstance(report, ShrinkReport):
        rows = [("method", f"shrink ({report.mode}, {report.saliency})"),
                ("block parameters removed", f"{report.achieved_ratio:.2%}"),
                ("parameters", f"{report.params_before:,} -> {report.params_after:,}"),
                ("shrinking time", f"{report.seconds:.1f} s")]
    else:
        rows = [("method", report.method), ("pattern", report.pattern), ("pruned layers", str(len(report.layers))),
                ("sparsity (pruned layers)", f"{report.total_sparsity:.2%}"),
                ("pruning time", f"{report.seconds:.1f} s")]
    if getattr(report, "attention", None):
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
    if hasattr(report, "achieved_ratio"):  # a shrunk model
        line = (f"Saved to {out}: {report.achieved_ratio:.2%} of the block parameters removed "
                f"({report.params_before:,} -> {report.params_after:,} parameters)")
    else:
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
    from .run import EvaluationFailedError, run_d2prune

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
