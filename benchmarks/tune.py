"""Tuning sweep of the D²Prune defaults on the dev split (BENCH.md v1.1), never on WikiText-2.

Coordinate sweep around today's defaults of D²Prune's `method_options` (ρ = kl_weight 10, s = activation_scale
"auto", refit_steps 8, kl_samples 4, with the cost defaults refit_tolerance 0.15 and kl_query_rows 64): one option
changed at a time,
at 50 % and 70 %, calibrating on C4 documents 0-699 and scoring PPL on documents 700-799. The default also runs at
calibration seeds 1 and 2, so the table shows whether a difference exceeds the seed spread.

Tuning rule: a value wins when its dev PPL/dense is below the default's at both levels and its mean over the levels
is below the default's by more than the calibration-seed noise (the sample std of the default's mean PPL/dense over
its seeds, once those rows exist: a single-seed difference smaller than that is not evidence); among a field's
winners the one with the lowest mean of dev PPL/dense over the levels is taken. When more than one field has a
winner, their combination is run too and kept only if it beats every single change on the same mean.

Cost rule, for the fields that trade time for accuracy (`COST_FIELDS`: the refit's stopping tolerance, the query rows
of the KL term): a value is
accepted when its dev PPL/dense is within `COST_MARGIN` (0.5 %) of the default's at every level; among the accepted
values the cheapest by construction is taken (the largest tolerance, the fewest rows: measured seconds on a shared
machine are too noisy to rank them).

Rows go to `--rows` as they finish (an interrupted run resumes); the table is rewritten after every row. A row is
found by the config it ran, whatever name it was stored under; `--table` rewrites the table from the stored rows
(and the shared run cache) and prunes nothing.

    python benchmarks/tune.py --threads 1                    # the sweep behind benchmarks/results/tuning.md
    python benchmarks/tune.py --threads 1 --table            # its table from the stored rows
    python benchmarks/tune.py --threads 1 --params kl_weight --levels 0.5 --num-samples 2 --seq-len 64 \\
        --eval-windows 2 --rows /tmp/tune_smoke.json --output /tmp/tune_smoke.md      # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

from protocol import (Protocol, add_protocol_arguments, protocol_from_args, recorded_command, repo_relative,
                      set_threads, write_report)

RESULTS = Path(__file__).resolve().parent / "results"
#: today's defaults of D²Prune's `method_options` (methods/d2prune/options.py), written explicitly so stored rows keep
#: their meaning if the defaults change
DEFAULTS: dict[str, Any] = {"kl_weight": 10.0, "activation_scale": "auto", "refit_steps": 8, "kl_samples": 4,
                            "refit_tolerance": 0.15, "kl_query_rows": 64}
#: options every row of the sweep sets besides the swept ones: a step count runs uncapped (the rows were made so; at
#: 32 x 512 calibration tokens the cap is above 8 steps for every matrix of SmolLM2)
FIXED: dict[str, Any] = {"refit_budget": False}
#: candidate values; "auto" = sqrt(512 * L) = 512 at L = 512, so 256 / 1024 are 0.5x / 2x auto and 1500 the paper's.
#: The cost fields list only values cheaper than the default (tolerance 0.15 and 64 rows are the cost rule's picks in
#: the sweep around 0 and every row: benchmarks/results/tuning_cost.md)
GRID: dict[str, list] = {
    "kl_weight": [0.0, 3.0, 30.0, 100.0],
    "refit_steps": [0, 4, 16],
    "activation_scale": [256.0, 1024.0, 1500.0],
    "kl_samples": [2, 8],
    "refit_tolerance": [0.2, 0.3],
    "kl_query_rows": [32, 16],
}
#: the options swept by default (the cost options on request: `--params refit_tolerance kl_query_rows`)
MAIN_PARAMS = ["kl_weight", "refit_steps", "activation_scale", "kl_samples"]
#: options judged by the cost rule (see the module docstring) -> the cheapest of several values; its margin
COST_FIELDS: dict[str, Any] = {"refit_tolerance": max, "kl_query_rows": min}
COST_MARGIN = 0.005
#: the costliest / least likely candidates run last (after the seed-noise rows)
LAST = {("activation_scale", 1500.0), ("kl_samples", 8)}


def config_name(changes: dict[str, Any]) -> str:
    if not changes:
        return "default"
    return ",".join(f"{k}={_fmt(v)}" for k, v in changes.items())


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plan(params: list[str], noise_seeds: list[int]) -> list[tuple[dict[str, Any], int]]:
    """(changes from the defaults, seed) in run order: default, single changes, seed-noise rows, costly changes."""
    single = [{p: v} for p in params for v in GRID[p]]
    first = [c for c in single if next(iter(c.items())) not in LAST]
    last = [c for c in single if next(iter(c.items())) in LAST]
    return [({}, 0)] + [(c, 0) for c in first] + [({}, s) for s in noise_seeds] + [(c, 0) for c in last]


def overrides_of(changes: dict[str, Any]) -> dict[str, Any]:
    """The config overrides of a row: D²Prune with `DEFAULTS` and `FIXED`, `changes` over them."""
    return {"method": "d2prune", "method_options": {**DEFAULTS, **FIXED, **changes}}


class Sweep:
    """The finished rows of a sweep and the tuning rule applied to them."""

    def __init__(self, protocol: Protocol, levels: list[str], noise_seeds: tuple[int, ...] = (1, 2)):
        self.protocol, self.levels, self.noise_seeds = protocol, levels, tuple(noise_seeds)

    def row(self, changes: dict[str, Any], level: str, seed: int = 0) -> Optional[dict]:
        return self.protocol.store.get(config_name(changes), level, seed, "dev")

    def mean_ratio(self, changes: dict[str, Any]) -> Optional[float]:
        rows = [self.row(changes, level) for level in self.levels]
        if any(r is None for r in rows):
            return None
        return statistics.mean(r["ratio"] for r in rows)

    def seed_means(self) -> list[float]:
        """The default's mean dev PPL/dense over the levels, per calibration seed that has every level."""
        means = []
        for seed in (0, *self.noise_seeds):
            rows = [self.row({}, level, seed) for level in self.levels]
            if all(rows):
                means.append(statistics.mean(r["ratio"] for r in rows))
        return means

    def seed_noise(self) -> Optional[float]:
        """Sample std of the default's per-seed mean PPL/dense (None with fewer than two seeds)."""
        means = self.seed_means()
        return statistics.stdev(means) if len(means) > 1 else None

    def below_everywhere(self, changes: dict[str, Any]) -> Optional[bool]:
        """Below the default's dev PPL/dense at every level (cost fields: within the margin); None while a row is
        missing."""
        pairs = [(self.row(changes, level), self.row({}, level)) for level in self.levels]
        if any(a is None or b is None for a, b in pairs):
            return None
        if next(iter(changes)) in COST_FIELDS:  # the cost rule: as good as the default within the margin
            return all(a["ratio"] <= b["ratio"] * (1 + COST_MARGIN) for a, b in pairs)
        return all(a["ratio"] < b["ratio"] for a, b in pairs)

    def wins(self, changes: dict[str, Any]) -> Optional[bool]:
        """`below_everywhere`, and (accuracy fields) a mean below the default's by more than the seed noise."""
        below = self.below_everywhere(changes)
        if not below or next(iter(changes)) in COST_FIELDS:
            return below
        noise = self.seed_noise()
        return noise is None or self.mean_ratio({}) - self.mean_ratio(changes) > noise

    def choice(self, params: list[str]) -> dict[str, Any]:
        """Per field, the winning value with the lowest mean ratio (cost fields: the cheapest accepted value);
        fields without a winner keep the default."""
        chosen = {}
        for p in params:
            winners = [({p: v}, self.mean_ratio({p: v})) for v in GRID[p] if self.wins({p: v})]
            if winners and p in COST_FIELDS:
                chosen[p] = COST_FIELDS[p](next(iter(w[0].values())) for w in winners)
            elif winners:
                chosen.update(min(winners, key=lambda w: w[1])[0])
        return chosen

    def pick(self, params: list[str], combined: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """What the rule takes: the combination of the fields' winners if it beats each of them, else the single
        winner with the lowest mean ratio; {} (the defaults) when nothing wins."""
        chosen = self.choice(params)
        if len(chosen) <= 1:
            return chosen
        singles = [({k: v}, self.mean_ratio({k: v})) for k, v in chosen.items()]
        best_single = min(singles, key=lambda s: s[1])
        both = self.mean_ratio(combined) if combined else None
        if both is not None and both < best_single[1]:
            return chosen
        return best_single[0] if combined and both is not None else chosen


def write_table(sweep: Sweep, params: list[str], noise_seeds: list[int], combined: Optional[dict], args,
                command: str) -> str:
    levels = sweep.levels
    store = sweep.protocol.store
    dense = store.get("dense", "-", 0, "dev")
    lines = [
        "# Tuning sweep of the D²Prune defaults (dev split, BENCH.md v1.1)",
        "",
        f"`{command}` ({datetime.date.today().isoformat()}, {args.threads or 'default'} torch thread(s)); "
        f"rows in `{repo_relative(store.path)}`.",
        "",
        f"SmolLM2-135M-Instruct; calibration {sweep.protocol.settings.num_samples} x "
        f"{sweep.protocol.settings.seq_len} "
        "tokens sampled (SparseGPT sampling) from C4 documents 0-699 of `c4_train_sample.jsonl`; dev PPL on documents "
        f"700-799 joined by blank lines, first {sweep.protocol.settings.eval_windows} x "
        f"{sweep.protocol.settings.seq_len}-token windows" + (f" (dense {dense['ppl']:.2f})" if dense else "")
        + ". WikiText-2 is not used for any choice here.",
        "",
        "Defaults swept around: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in DEFAULTS.items())
        + ' ("auto" = sqrt(512 L) = 512 at L = 512).',
        "",
        "**Tuning rule.** A value wins when its dev PPL/dense is below the default's at both "
        + " and ".join(levels) + "; among a field's winners the lowest mean of dev PPL/dense over the levels is "
        "taken. If several fields have a winner, their combination is run too and kept only if it beats every "
        "single change on the same mean. Cost fields (" + ", ".join(sorted(COST_FIELDS)) + "): accepted within "
        f"{COST_MARGIN:.1%} of the default's dev PPL/dense at every level, the cheapest accepted value taken (largest "
        "tolerance, fewest rows).",
        "",
        "| config | " + " | ".join(f"{lv} dev PPL" for lv in levels) + " | mean PPL/dense | "
        + " | ".join(f"{lv} s" for lv in levels) + " | wins at all levels |",
        "|---|" + "---:|" * (2 * len(levels) + 1) + "---|",
    ]
    configs = [c for c, seed in plan(params, []) if seed == 0] + ([combined] if combined else [])
    for changes in configs:
        rows = [sweep.row(changes, lv) for lv in levels]
        if all(r is None for r in rows):
            continue
        ppl = " | ".join(f"{r['ppl']:.2f}" if r else "…" for r in rows)
        secs = " | ".join(f"{r['seconds']:.0f}" if r else "…" for r in rows)
        mean = sweep.mean_ratio(changes)
        wins = "" if not changes else {None: "…", True: "yes", False: "no"}[sweep.wins(changes)]
        if changes and sweep.below_everywhere(changes) and not sweep.wins(changes):
            wins = "below at every level, within seed noise"
        label = config_name(changes) + (" (combined)" if changes is combined and len(changes) > 1 else "")
        lines.append(f"| {label} | {ppl} | {mean:.3f} | {secs} | {wins} |" if mean is not None
                     else f"| {label} | {ppl} | … | {secs} | {wins} |")
    lines += ["", "Seed spread of the default (dev PPL; calibration seeds " + ", ".join(map(str, [0] + noise_seeds))
              + "):", ""]
    for lv in levels:
        values = [r["ppl"] for s in [0] + noise_seeds if (r := sweep.row({}, lv, s))]
        if len(values) > 1:
            lines.append(f"- {lv}: " + ", ".join(f"{v:.2f}" for v in values)
                         + f" (mean {statistics.mean(values):.2f}, "
                         f"std {statistics.stdev(values):.2f}, range {max(values) - min(values):.2f})")
        elif values:
            lines.append(f"- {lv}: {values[0]:.2f} (other seeds not run yet)")
    seed_means = sweep.seed_means()
    if len(seed_means) > 1:
        lines += ["- mean PPL/dense of the default per seed: " + ", ".join(f"{m:.3f}" for m in seed_means)
                  + f" (std {sweep.seed_noise():.3f}): a change whose mean is not below the default's by more than "
                  "this is within calibration-seed noise and does not win."]
    choice = sweep.pick(params, combined)
    missing = [config_name(c) + f" seed {s}" for c, s in plan(params, noise_seeds)
               if any(sweep.row(c, lv, s) is None for lv in levels)]
    lines += ["", "**What the rule picks**: " + (", ".join(f"{k} = {_fmt(v)}" for k, v in choice.items()) if choice
                                                else "the defaults (no single change wins at every level)")
              + (" (so far)." if missing else ".")]
    if choice and sweep.mean_ratio(choice) is not None and sweep.mean_ratio({}) is not None:
        lines[-1] += (f" Mean PPL/dense {sweep.mean_ratio(choice):.3f} against the default's "
                      f"{sweep.mean_ratio({}):.3f} (seed 0).")
    if missing:
        lines += ["", "Not finished yet: " + "; ".join(missing) + "."]
    return write_report("\n".join(lines) + "\n", args.output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser)
    parser.add_argument("--levels", nargs="+", default=["0.5", "0.7"])
    parser.add_argument("--params", nargs="+", default=MAIN_PARAMS, choices=list(GRID))
    parser.add_argument("--noise-seeds", nargs="*", type=int, default=[1, 2],
                        help="Extra calibration seeds of the default (seed spread).")
    parser.add_argument("--no-combine", action="store_true", help="Do not run the combination of the winners.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", default=str(RESULTS / "tuning_rows.json"))
    parser.add_argument("--output", default=str(RESULTS / "tuning.md"))
    parser.add_argument("--table", action="store_true",
                        help="Only rewrite the table from the stored rows (and runs of other scripts in the run "
                             "cache); prunes nothing.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("optimum_d2prune", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    set_threads(args.threads)
    command = recorded_command("tune.py", argv, drop=("--table",))

    protocol = protocol_from_args(args, args.rows)
    sweep = Sweep(protocol, args.levels, args.noise_seeds)

    def run(changes: dict[str, Any], level: str, seed: int, combined: Optional[dict] = None) -> None:
        if args.table:
            protocol.finished(config_name(changes), overrides_of(changes), level, seed, "dev")
            return
        protocol.run(config_name(changes), overrides_of(changes), level, seed, "dev")
        write_table(sweep, args.params, args.noise_seeds, combined, args, command)

    if not args.table:
        protocol.dense("dev")
    for changes, seed in plan(args.params, args.noise_seeds):
        for level in args.levels:
            run(changes, level, seed)
    combined = sweep.choice(args.params)
    if len(combined) > 1 and not args.no_combine:
        for level in args.levels:
            run(combined, level, 0, combined)
    print(write_table(sweep, args.params, args.noise_seeds, combined if len(combined) > 1 else None, args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
