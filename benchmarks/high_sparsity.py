"""High-sparsity benchmark: non-uniform budgets (OWL) and stronger reconstruction against the baselines.

BENCH.md v1 protocol (SmolLM2-135M-Instruct, 32 x 512 C4 calibration tokens, seed 0, WikiText-2 PPL on the first 32
windows of 512 tokens). One JSON row per (config, level, seed, calibration size) in `--json`; a rerun skips the rows
already there, so an interrupted sweep resumes. The markdown table is printed at the end (or with `--table`).

    python benchmarks/high_sparsity.py --threads 1                                  # 50/60/70/80 %, five configs
    python benchmarks/high_sparsity.py --levels 0.7 --configs d2prune max_quality --num-samples 16
    python benchmarks/high_sparsity.py --extra "d2+recon:block_reconstruction=true" --configs d2+recon
    python benchmarks/high_sparsity.py --table                                      # print the table and exit
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch
from quality import add_protocol_arguments, calibration_batches, level_kwargs, parse_value

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.evaluation import perplexity
from optimum_d2prune.models import load_causal_lm

#: name -> D2PruneConfig fields (besides the level); "+owl" rows are skipped for N:M (uniform by definition)
CONFIGS: dict[str, dict] = {
    "sparsegpt": {"method": "sparsegpt"},
    "sparsegpt+owl": {"method": "sparsegpt", "sparsity_allocation": "owl"},
    "d2prune": {"method": "d2prune"},
    "d2prune+owl": {"method": "d2prune", "sparsity_allocation": "owl"},
    "max_quality": {"method": "d2prune", "preset": "max_quality"},
}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "high_sparsity_rows.json"


def parse_extra(text: str) -> tuple[str, dict]:
    """`NAME:key=value,key=value` -> (NAME, fields); e.g. `d2+tol:refine_steps=64,refine_tolerance=0.001`."""
    name, _, body = text.partition(":")
    fields = dict(item.split("=", 1) for item in body.split(",") if item)
    return name, {"method": "d2prune", **{k: parse_value(v) for k, v in fields.items()}}


def row_key(row: dict) -> tuple:
    return row["config"], row["level"], row["seed"], row["num_samples"]


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def print_table(rows: list[dict], configs: list[str]) -> None:
    """Markdown table: level x config, PPL, PPL/dense, prune seconds and time relative to SparseGPT."""
    dense = {(r["seed"], r["num_samples"]): r["ppl"] for r in rows if r["config"] == "dense"}
    by_key = {row_key(r): r for r in rows}
    levels = sorted({r["level"] for r in rows if r["config"] != "dense"}, key=lambda x: (":" in x, x))
    print("\n| level | config | PPL | PPL/dense | prune s | x SparseGPT time | block sparsity min-max |")
    print("|---|---|---:|---:|---:|---:|---|")
    for level in levels:
        for config in configs:
            for r in (r for r in rows if r["config"] == config and r["level"] == level):
                base = by_key.get(("sparsegpt", level, r["seed"], r["num_samples"]))
                ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else ""
                budgets = r.get("block_sparsity") or []
                spread = f"{min(budgets):.3f}-{max(budgets):.3f}" if budgets else ""
                ppl_dense = r["ppl"] / dense[(r["seed"], r["num_samples"])]
                print(f"| {level} | {config} | {r['ppl']:.2f} | {ppl_dense:.3f} | {r['seconds']:.1f} | {ratio} "
                      f"| {spread} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser)
    parser.add_argument("--levels", nargs="+", default=["0.5", "0.6", "0.7", "0.8"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--extra", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="An ad-hoc d2prune config to add to CONFIGS (repeatable); list it in --configs.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="Resumable rows file.")
    parser.add_argument("--table", action="store_true", help="Print the table of the rows in --json and exit.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {**CONFIGS, **dict(parse_extra(e) for e in args.extra)}
    unknown = [c for c in args.configs if c not in configs]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; known: {sorted(configs)} (add one with --extra)")
    rows = load_rows(args.json)
    if args.table:
        print_table(rows, args.configs)
        return 0
    done = {row_key(r) for r in rows}

    def save(row: dict) -> None:
        rows.append(row)
        done.add(row_key(row))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
        print(json.dumps(row), file=sys.stderr)

    model, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file)
    dense_state = copy.deepcopy(model.state_dict())

    def ppl() -> float:
        return perplexity(model, tokenizer, args.eval, seq_len=args.seq_len, max_windows=args.eval_windows)

    for seed in args.seeds:
        args.seed = seed
        calib = None
        if ("dense", "-", seed, args.num_samples) not in done:
            save({"config": "dense", "level": "-", "seed": seed, "num_samples": args.num_samples, "ppl": ppl(),
                  "seconds": 0.0})
        for level in args.levels:
            for name in args.configs:
                fields = {**configs[name], **level_kwargs(level), "seed": seed}
                if ":" in level and fields.get("sparsity_allocation", "uniform") != "uniform":
                    continue  # N:M masks are uniform by definition
                if (name, level, seed, args.num_samples) in done:
                    continue
                calib = calib if calib is not None else calibration_batches(args, model, tokenizer)
                model.load_state_dict(dense_state)
                pruner = D2Pruner(D2PruneConfig(**fields))
                start = time.perf_counter()
                pruner.prune(model, calib)
                seconds = time.perf_counter() - start
                report = pruner.report
                save({"config": name, "level": level, "seed": seed, "num_samples": args.num_samples, "ppl": ppl(),
                      "seconds": seconds, "fields": fields, "sparsity": report.total_sparsity,
                      "block_sparsity": report.block_sparsity,
                      "reconstruction": [(r.error_before, r.error_after) for r in report.reconstruction]})
    print(f"\nModel {args.model}; calibration {args.num_samples} x {args.seq_len} tokens of "
          f"{Path(args.calibration).name}; WikiText-2 PPL on {args.eval_windows} x {args.seq_len} tokens; "
          f"seeds {args.seeds}.")
    print_table(rows, args.configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
