"""How many query rows the KL term needs: the q/k/v choice with every attention row vs a subset (`kl_query_rows`).

One D²Prune run per level on the dev split (BENCH.md v1.1: calibration on C4 documents 0-699). In every block the
three candidates are scored with all rows and with each row count of `--rows`, from the same captured sequences and
the same candidate solutions (the library's `methods.d2prune.attention.choose_unupdated_projection` is wrapped to
call it once per row count, `AttentionScorer.max_query_rows` set to it; the run continues with the all-rows
choice). Printed per level and row count: blocks whose choice equals the
all-rows choice, and the relative error of the estimated KL (median and max over blocks and candidates).

    python benchmarks/kl_rows.py --threads 2            # the table in benchmarks/results/tuning_cost.md
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from typing import Any, Optional

from protocol import DEV_CALIBRATION_DOCS, add_protocol_arguments, make_config, set_threads, write_report

from optimum_d2prune import D2Pruner
from optimum_d2prune.calibration import get_calibration_dataset
from optimum_d2prune.methods.d2prune import attention as attention_module
from optimum_d2prune.models import load_causal_lm


def run_level(model, calib, level: str, row_counts: list[int]) -> list[dict[Optional[int], Any]]:
    """One record per block: row count (None = all) -> AttentionRecord."""
    choose = attention_module.choose_unupdated_projection
    records: list[dict[Optional[int], Any]] = []

    def every_row_count(scorer, *args, **kwargs):
        per_count = {rows: choose(dataclasses.replace(scorer, max_query_rows=rows), *args, **kwargs)
                     for rows in [None, *row_counts]}
        records.append(per_count)
        return per_count[None]

    attention_module.choose_unupdated_projection = every_row_count
    try:
        D2Pruner(make_config({"method": "d2prune"}, level)).prune(model, calib)
    finally:
        attention_module.choose_unupdated_projection = choose
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser)
    parser.add_argument("--levels", nargs="+", default=["0.5", "0.7", "2:4"])
    parser.add_argument("--rows", nargs="+", type=int, default=[128, 64, 32])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = get_calibration_dataset(args.calibration, tokenizer, args.num_samples, args.seq_len, args.seed,
                                    documents=DEV_CALIBRATION_DOCS)
    lines = [f"KL on a subset of query rows vs every row (dev split calibration, {args.num_samples} x {args.seq_len} "
             f"tokens, seed {args.seed}; `python benchmarks/kl_rows.py`):", "",
             "| level | query rows | choice = all-rows choice | KL rel. error median | max |", "|---|---:|---:|---:|---:|"]
    for level in args.levels:
        model.load_state_dict(dense)
        records = run_level(model, calib, level, args.rows)
        for rows in args.rows:
            same = sum(r[rows].chosen == r[None].chosen for r in records)
            errors = [abs(r[rows].kls[c] - r[None].kls[c]) / max(r[None].kls[c], 1e-12) for r in records
                      for c in r[None].kls]
            lines.append(f"| {level} | {rows} | {same} / {len(records)} | {statistics.median(errors):.2%} | "
                         f"{max(errors):.2%} |")
        print(lines[-1], file=sys.stderr)
    print(write_report("\n".join(lines) + "\n", args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
