"""Ablation: where D²Prune's gain over SparseGPT comes from (dual-Taylor terms, attention awareness, refit).

Each row prunes the dense SmolLM2 twice: calibrated on all 800 C4 documents and scored on WikiText-2 (BENCH.md v1,
"bench"), and calibrated on documents 0-699 and scored on documents 700-799 (v1.1 "dev"). SparseGPT, SparseGPT +
refit, the default and dual-Taylor + dynamic attention + refit (the default's unstructured setting, the same runs at
unstructured levels) run at calibration seeds 0, 1, 2 (mean ± std); the other rows at seed 0. Rows go to `--rows-file`
as they finish (an interrupted run resumes) and the table is rewritten after each.

    python benchmarks/ablation.py --threads 1           # benchmarks/results/ablation.md (hours on 1 CPU thread)
    python benchmarks/ablation.py --threads 1 --levels 0.5 --rows-only sparsegpt --seeds 0 --splits dev \\
        --num-samples 2 --seq-len 64 --eval-windows 2 --rows-file /tmp/abl.json --output /tmp/abl.md   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimum_d2prune import D2PruneConfig
from protocol import (SPLITS, Protocol, add_protocol_arguments, add_results_doc_argument, describe_overrides,
                      mean_std, protocol_from_args, recorded_command, repo_relative, results_section, set_threads,
                      write_report, write_section)

RESULTS = Path(__file__).resolve().parent / "results"
#: the default D²Prune's refit (at most these steps, stopped at the default tolerance); "SparseGPT + refit" uses the
#: same (the tolerance is a default of both methods)
_D2PRUNE = D2PruneConfig(method="d2prune").method_options
REFIT_STEPS = _D2PRUNE.refit_steps
REFIT = f"≤ {REFIT_STEPS} steps, tolerance {_D2PRUNE.refit_tolerance:g}"
#: the refit of the rows that name it: its step count, not capped by the calibration size (at 32 x 512 tokens the cap
#: is above 8 steps for every matrix of SmolLM2, so the default's capped refit is the same run)
WITH_REFIT = {"refit_steps": REFIT_STEPS, "refit_budget": False}


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    seeded: bool = False  # run at every --seeds (mean ± std), else at the first seed only


#: the ablation, in table order; explicit options everywhere except "default" (the library's defaults as they are)
ROWS = [
    Row("sparsegpt", "SparseGPT", {"method": "sparsegpt"}, seeded=True),
    Row("sparsegpt+refit", f"SparseGPT + refit ({REFIT})",
        {"method": "sparsegpt", "method_options": WITH_REFIT}, seeded=True),
    Row("paper", "D²Prune as in the paper (s = 1500, λ1 = 1, λ2 = 0, v un-updated, no refit)",
        {"method": "d2prune", "method_options": {"activation_scale": 1500.0, "lambda1": 1.0, "lambda2": 0.0,
                                                 "skip_update": "v", "refit_steps": 0}}),
    Row("dual-taylor", "+ dual-Taylor terms only (all q/k/v updated, no refit)",
        {"method": "d2prune", "method_options": {"skip_update": "none", "refit_steps": 0}}),
    Row("dual-taylor+refit", f"dual-Taylor terms + refit ({REFIT}), all q/k/v updated (no attention awareness)",
        {"method": "d2prune", "method_options": {"skip_update": "none", **WITH_REFIT}}),
    *[Row(f"attention-{a}", f"+ attention awareness only (λ1 = 0, {label}, no refit)",
          {"method": "d2prune", "method_options": {"lambda1": 0.0, "skip_update": a, "refit_steps": 0}})
      for a, label in (("q", "q un-updated"), ("k", "k un-updated"), ("v", "v un-updated"),
                       ("dynamic", "dynamic q/k/v"))],
    Row("both", "dual-Taylor + dynamic attention, no refit",
        {"method": "d2prune", "method_options": {"skip_update": "dynamic", "refit_steps": 0}}),
    # the default's setting at unstructured levels (the same runs), and at N:M the dynamic choice the default skips
    Row("both+refit", f"+ refit ({REFIT}): the default's unstructured setting",
        {"method": "d2prune", "method_options": {"skip_update": "dynamic", **WITH_REFIT}}, seeded=True),
    Row("default", "D²Prune default (N:M: all q/k/v updated)", {"method": "d2prune"}, seeded=True),
]
ROW_NAMES = [r.name for r in ROWS]


def runs(rows: list[Row], levels: list[str], seeds: list[int], splits: list[str]):
    """(row, level, seed, split) in run order: the seeded rows (the comparison a reader needs first: SparseGPT,
    SparseGPT + refit, the default) at every level, one seed at a time; then the breakdown rows at the first seed."""
    for seed in seeds:
        for level in levels:
            for row in rows:
                if row.seeded:
                    for split in splits:
                        yield row, level, seed, split
    for level in levels:
        for row in rows:
            if not row.seeded:
                for split in splits:
                    yield row, level, seeds[0], split


def write_table(protocol: Protocol, rows: list[Row], args, command: str) -> str:
    store = protocol.store
    settings = protocol.settings

    def seeds_of(row: Row) -> list[int]:
        return args.seeds if row.seeded else args.seeds[:1]

    def values(row: Row, level: str, split: str, key: str = "ppl") -> list[float]:
        found = [store.get(row.name, level, s, split) for s in seeds_of(row)]
        return [r[key] for r in found if r is not None]

    def paired(row: Row, control: Row, level: str, split: str) -> list[float]:
        """PPL of `row` over `control`'s at the same calibration seed: the seed moves both (at 50 % one seed to the
        next moves SparseGPT by several percent), a paired ratio does not carry that into the comparison."""
        ratios = []
        for s in seeds_of(row):
            mine, theirs = store.get(row.name, level, s, split), store.get(control.name, level, s, split)
            if mine is not None and theirs is not None:
                ratios.append(mine["ppl"] / theirs["ppl"])
        return ratios

    def cell(vals: list[float], expected: int, digits: int = 2) -> str:
        if not vals:
            return "…"
        text = mean_std(vals, digits)
        return text if len(vals) == expected else f"{text} ({len(vals)}/{expected} seeds)"

    def change(ratios: list[float]) -> str:
        return mean_std([100 * (r - 1) for r in ratios], 1) + " %" if ratios else ""

    sparsegpt, refit = (next(r for r in ROWS if r.name == n) for n in ("sparsegpt", "sparsegpt+refit"))
    dense = {split: store.get("dense", "-", 0, split) for split in args.splits}
    header = ["level", "configuration"]
    for split, name in (("bench", "WikiText-2"), ("dev", "dev")):
        if split in args.splits:
            header += [f"{name} PPL", "x SparseGPT", "vs SparseGPT + refit"]
    header += ["prune s"]
    lines = [
        "# Ablation: where the gain comes from (SmolLM2-135M, BENCH.md v1 + v1.1 dev split)",
        "",
        f"`{command}` ({datetime.date.today().isoformat()}, {args.threads or 'default'} torch thread(s)); rows in "
        f"`{repo_relative(store.path)}`.",
        "",
        f"{settings.num_samples} x {settings.seq_len} calibration tokens (SparseGPT sampling). WikiText-2 column: "
        f"calibrated on all 800 documents of `c4_train_sample.jsonl`, PPL on the first {settings.eval_windows} x "
        f"{settings.seq_len} tokens of WikiText-2 test" + (f" (dense {dense['bench']['ppl']:.2f})"
                                                          if dense.get("bench") else "")
        + f". Dev column: calibrated on documents 0-699, PPL on documents 700-799 ({settings.eval_windows} x "
        f"{settings.seq_len} tokens" + (f", dense {dense['dev']['ppl']:.2f}" if dense.get("dev") else "") + "). "
        f"Rows marked ± ran at calibration seeds {', '.join(map(str, args.seeds))} (mean ± sample std); the others "
        f"at seed {args.seeds[0]}. Prune seconds: the {'WikiText-2' if 'bench' in args.splits else 'dev'} runs. "
        "x SparseGPT and vs SparseGPT + refit are paired: the row's PPL over the control's at the same calibration "
        "seed, then mean ± std over the seeds (a row at one seed is compared with the controls' run at that seed).",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|" + "---:|" * (len(header) - 2),
    ]
    time_split = "bench" if "bench" in args.splits else "dev"
    for level in args.levels:
        for row in rows:
            expected = len(seeds_of(row))
            cells = [level, row.label + (" ±" if row.seeded and len(args.seeds) > 1 else "")]
            for split in ("bench", "dev"):
                if split not in args.splits:
                    continue
                cells.append(cell(values(row, level, split), expected))
                ratios = paired(row, sparsegpt, level, split)
                cells.append(mean_std(ratios, 3) if ratios and row is not sparsegpt else "")
                cells.append(change(paired(row, refit, level, split)) if row is not refit else "")
            secs = values(row, level, time_split, "seconds")
            cells.append(f"{statistics.mean(secs):.0f}" if secs else "…")
            lines.append("| " + " | ".join(cells) + " |")
    missing = sum(1 for r, lv, s, sp in runs(rows, args.levels, args.seeds, args.splits)
                  if store.get(r.name, lv, s, sp) is None)
    lines += ["", "Configurations (fields not named are the library defaults of the run):", ""]
    lines += [f"- `{r.name}`: " + (describe_overrides(r.overrides) or "defaults") for r in rows]
    if missing:
        total = len(list(runs(rows, args.levels, args.seeds, args.splits)))
        lines += ["", f"Not finished yet: {missing} of the {total} runs."]
    return write_report("\n".join(lines) + "\n", args.output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser)
    parser.add_argument("--levels", nargs="+", default=["0.5", "0.7", "2:4"])
    parser.add_argument("--rows-only", nargs="+", default=None, choices=ROW_NAMES, metavar="ROW",
                        help=f"Run only these rows (of {ROW_NAMES}).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="Calibration seeds of the ± rows (SparseGPT, SparseGPT + refit, default).")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows-file", default=str(RESULTS / "ablation_rows.json"))
    parser.add_argument("--output", default=str(RESULTS / "ablation.md"))
    parser.add_argument("--table", action="store_true",
                        help="Only rewrite the table from the finished rows (and from runs of other scripts in the "
                             "run cache); prunes nothing.")
    add_results_doc_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("optimum_d2prune", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    set_threads(args.threads)
    command = recorded_command("ablation.py", argv, drop=("--table",))
    rows = [r for r in ROWS if args.rows_only is None or r.name in args.rows_only]

    protocol = protocol_from_args(args, args.rows_file)
    if args.table:
        for row, level, seed, split in runs(rows, args.levels, args.seeds, args.splits):
            protocol.finished(row.name, row.overrides, level, seed, split)
    else:
        for split in args.splits:
            protocol.dense(split)
        for row, level, seed, split in runs(rows, args.levels, args.seeds, args.splits):
            protocol.run(row.name, row.overrides, level, seed, split)
            write_table(protocol, rows, args, command)
    text = write_table(protocol, rows, args, command)
    if args.results_doc:
        write_section("ablation", results_section(text, f"{command} --table --results-doc"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
