"""High-sparsity benchmark: non-uniform budgets (OWL) and stronger reconstruction against the baselines.

BENCH.md v1 ("bench": calibrated on all 800 C4 documents, WikiText-2 PPL) and v1.1 ("dev": calibrated on documents
0-699, PPL on documents 700-799), SmolLM2-135M-Instruct, 32 x 512 calibration tokens. Rows go to `--rows` as they
finish (an interrupted sweep resumes) and every run also goes to the shared run cache (`results/runs.json`), so a
configuration already pruned by the ablation or the tuning sweep is not pruned again. The levels of `--seeded-levels`
run at every `--seeds` (mean ± std); the others at the first seed. `--figure` draws the per-block sparsity of the
OWL budgets at 70 %. `--table` rewrites the table from the stored runs (nothing is pruned), `--results-doc` also
its section of docs/results.md.

    python benchmarks/high_sparsity.py --threads 1          # 50/60/70/80 % and 2:4, every config, both splits
    python benchmarks/high_sparsity.py --threads 1 --levels 0.7 --configs d2prune max_quality --splits dev
    python benchmarks/high_sparsity.py --threads 1 --extra "d2+recon:reconstruction=true" --configs d2+recon
    python benchmarks/high_sparsity.py --threads 1 --table --figure --results-doc     # the committed table
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import sys
from pathlib import Path
from typing import Optional

from protocol import (SPLITS, Protocol, add_protocol_arguments, add_results_doc_argument, describe_overrides,
                      mean_std, parse_overrides, protocol_from_args, recorded_command, repo_relative,
                      results_section, set_threads, write_report, write_section)

RESULTS = Path(__file__).resolve().parent / "results"
#: name -> config overrides (besides level and seed), today's grouped form; "+owl" rows are skipped for N:M (uniform
#: by definition)
CONFIGS: dict[str, dict] = {
    "sparsegpt": {"method": "sparsegpt"},
    "sparsegpt+owl": {"method": "sparsegpt", "allocation": "owl"},
    "d2prune": {"method": "d2prune"},
    "d2prune+owl": {"method": "d2prune", "allocation": "owl"},
    "max_quality": {"method": "d2prune", "preset": "max_quality"},
    # the preset with the other budgets: OWL where it is uniform (below its `min_sparsity`), uniform where it is OWL
    "max_quality+owl": {"method": "d2prune", "preset": "max_quality", "allocation": "owl"},
    "max_quality-owl": {"method": "d2prune", "preset": "max_quality", "allocation": "uniform"},
    # the preset without ADMM; the same with OWL at every level, and an option measured on that one
    "max_quality-admm": {"method": "d2prune", "preset": "max_quality", "method_options": {"admm_steps": 0}},
    "max_quality+owl-admm": {"method": "d2prune", "preset": "max_quality", "allocation": "owl",
                             "method_options": {"admm_steps": 0}},
    "max_quality+owl-admm+model": {"method": "d2prune", "preset": "max_quality", "allocation": "owl",
                                   "method_options": {"admm_steps": 0},
                                   "reconstruction_options": {"reference": "model"}},
    # what D²Prune's own saliency and attention awareness are worth once the preset's additions are there
    "sparsegpt+max_quality": {"method": "sparsegpt", "preset": "max_quality"},
}
#: ablation rows, measured at these levels only (each run costs 10-25 min of one core)
ONLY_AT: dict[str, tuple[str, ...]] = {"max_quality+owl": ("0.5", "0.6", "0.7"), "max_quality-owl": ("0.8",),
                                       "max_quality-admm": ("0.5", "2:4"), "max_quality+owl-admm+model": ("0.7",),
                                       "sparsegpt+max_quality": ("0.5", "0.7")}
#: ablation rows that run at the first seed only at these seeded levels (same cost)
FIRST_SEED_AT: dict[str, tuple[str, ...]] = {"max_quality-admm": ("0.5",), "max_quality+owl-admm": ("0.5",),
                                             "sparsegpt+max_quality": ("0.5",)}
FIGURE = "owl_block_sparsity_70.png"  # written next to --output


def parse_extra(text: str) -> tuple[str, dict]:
    """`NAME:key=value,key=value` -> (NAME, overrides), keys as `--set` takes them (`protocol.parse_overrides`: a
    group-qualified name or one that belongs to one group); e.g.
    `d2+tol:method_options.refit_steps=64,method_options.refit_tolerance=0.001`. The method is d2prune unless named."""
    name, _, body = text.partition(":")
    return name, {"method": "d2prune", **parse_overrides([item for item in body.split(",") if item])}


def applies(name: str, overrides: dict, level: str) -> bool:
    """OWL budgets are for unstructured sparsity only (an N:M pattern is uniform by definition); the options of
    `ONLY_AT` run at their levels."""
    if name in ONLY_AT and level not in ONLY_AT[name]:
        return False
    return ":" not in level or overrides.get("allocation", "uniform") == "uniform"


def seeds_of(name: str, level: str, seeds: list[int], seeded: list[str]) -> list[int]:
    """The calibration seeds a config runs at: every one at the seeded levels (but `FIRST_SEED_AT`'s), the first
    elsewhere."""
    return seeds if level in seeded and level not in FIRST_SEED_AT.get(name, ()) else seeds[:1]


def runs(configs: dict[str, dict], names: list[str], levels: list[str], seeds: list[int], seeded: list[str],
         splits: list[str]):
    """(name, level, seed, split) in run order: every config at the first seed, then the extra seeds."""
    for seed in seeds:
        for level in levels:
            for name in names:
                if applies(name, configs[name], level) and seed in seeds_of(name, level, seeds, seeded):
                    for split in splits:
                        yield name, level, seed, split


def write_table(protocol: Protocol, configs: dict[str, dict], args, command: str) -> str:
    store = protocol.store
    dense = {split: store.get("dense", "-", 0, split) for split in args.splits}

    def values(name: str, level: str, split: str, key: str) -> list[float]:
        seeds = seeds_of(name, level, args.seeds, args.seeded_levels)
        return [r[key] for s in seeds if (r := store.get(name, level, s, split)) is not None and key in r]

    time_split = "bench" if "bench" in args.splits else args.splits[0]
    header = ["level", "config"] + [f"{'WikiText-2' if s == 'bench' else 'dev'} PPL/dense" for s in args.splits]
    header += ["prune s", "x SparseGPT time", "block sparsity min-max"]
    lines = [
        "# High sparsity: OWL budgets and block reconstruction (SmolLM2-135M, BENCH.md v1 + v1.1 dev split)",
        "",
        f"`{command}` ({datetime.date.today().isoformat()}, {args.threads or 'default'} torch thread(s)); rows in "
        f"`{repo_relative(store.path)}`.",
        "",
        f"{protocol.settings.num_samples} x {protocol.settings.seq_len} C4 calibration tokens; WikiText-2: "
        "calibrated on all 800 documents, PPL on WikiText-2 test" + (f" (dense {dense['bench']['ppl']:.2f})"
                                                                     if dense.get("bench") else "")
        + "; dev: calibrated on documents 0-699, PPL on documents 700-799" + (f" (dense {dense['dev']['ppl']:.2f})"
                                                                             if dense.get("dev") else "")
        + (f". Levels {', '.join(args.seeded_levels)} at calibration seeds {', '.join(map(str, args.seeds))} "
           f"(mean ± std; a row marked \"(seed {args.seeds[0]})\" ran at that seed only), the others at seed "
           f"{args.seeds[0]}" if args.seeded_levels and len(args.seeds) > 1
           else f". Every row at calibration seed {args.seeds[0]}")
        + f". Seconds: the {time_split} runs' pruning time as each run measured it; rows made at different times "
        "share the machine with different numbers of other runs, so the seconds and their ratio compare only rows "
        "that ran under the same load (for a timing claim run the configs of a level back to back on an idle "
        "machine).",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|" + "---:|" * (len(header) - 3) + "---|",
    ]
    for level in args.levels:
        base = values("sparsegpt", level, time_split, "seconds")
        for name in args.configs:
            if not applies(name, configs[name], level):
                continue
            cells = [level, name]
            planned = len(seeds_of(name, level, args.seeds, args.seeded_levels))
            single = planned == 1 and level in args.seeded_levels and len(args.seeds) > 1
            for split in args.splits:
                ratios = values(name, level, split, "ratio")
                partial = f" ({len(ratios)} of {planned} seeds)" if 0 < len(ratios) < planned else ""
                partial += f" (seed {args.seeds[0]})" if single and ratios else ""
                cells.append(mean_std(ratios, 3) + partial if ratios else "…")
            secs = values(name, level, time_split, "seconds")
            cells.append(f"{statistics.mean(secs):.0f}" if secs else "…")
            cells.append(f"{statistics.mean(secs) / statistics.mean(base):.2f}" if secs and base else "")
            budgets = values(name, level, time_split, "block_sparsity")
            cells.append(f"{min(budgets[0]):.3f}-{max(budgets[0]):.3f}" if budgets else "")
            lines.append("| " + " | ".join(cells) + " |")
    todo = [r for r in runs(configs, args.configs, args.levels, args.seeds, args.seeded_levels, args.splits)
            if store.get(r[0], r[1], r[2], r[3]) is None]
    lines += ["", "Configurations: " + "; ".join(f"`{n}`: " + describe_overrides(configs[n]) for n in args.configs)
              + "."]
    if todo:
        lines += ["", f"Not finished yet: {len(todo)} run(s), next: " + ", ".join(" ".join(map(str, r))
                                                                              for r in todo[:4]) + "."]
    return write_report("\n".join(lines) + "\n", args.output)


def draw_budgets(protocol: Protocol, path: Path, level: str = "0.7", seed: int = 0) -> Optional[Path]:
    """The per-block sparsity of the OWL runs at `level` (one line per config and split found), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [(name, split, row["block_sparsity"]) for name in ("d2prune+owl", "sparsegpt+owl", "max_quality+owl")
             for split in SPLITS
             if (row := protocol.store.get(name, level, seed, split)) and row.get("block_sparsity")]
    if not found:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    seen = set()
    for name, split, budgets in found:
        if (split, tuple(budgets)) in seen:  # the budgets come from the dense model: equal for every method
            continue
        seen.add((split, tuple(budgets)))
        ax.plot(range(len(budgets)), budgets, marker="o", ms=3,
                label=f"OWL budgets, calibration on C4 documents {'0-799' if split == 'bench' else '0-699 (dev)'}")
    ax.axhline(float(level), color="grey", lw=0.8, ls="--", label=f"uniform {float(level):.0%}")
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_title(f"SmolLM2-135M, per-block sparsity at {float(level):.0%} (OWL, λ = 0.08, M = 5)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser)
    parser.add_argument("--levels", nargs="+", default=["0.5", "0.6", "0.7", "0.8", "2:4"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--extra", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="An ad-hoc config to add to CONFIGS (repeatable; list it in --configs). Keys: a config "
                             "field (preset=max_quality, allocation=owl), GROUP.NAME "
                             "(method_options.admm_steps=0, allocation_options.deviation=0.04, "
                             "reconstruction_options.reference=model), or a bare option name that belongs to one "
                             "group (admm_steps=0; refit_steps, refit_tolerance and damp_percent need their group). "
                             "The method is d2prune unless method= is given.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seeded-levels", nargs="*", default=["0.5", "0.7"],
                        help="Levels run at every --seeds (the others at the first seed only).")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", default=str(RESULTS / "high_sparsity_rows.json"), help="Resumable rows file.")
    parser.add_argument("--output", default=None,
                        help="Where the table goes (default: results/high_sparsity.md with the default --rows, else "
                             "next to --rows as .md, so that a partial sweep leaves the committed table alone).")
    parser.add_argument("--table", action="store_true",
                        help="Only rewrite the table (and figure) from the finished rows (and from runs of other "
                             "scripts in the run cache); prunes nothing.")
    parser.add_argument("--figure", action="store_true",
                        help=f"Also draw the 70 %% OWL budgets ({FIGURE}, next to --output).")
    add_results_doc_argument(parser)
    args = parser.parse_args(argv)
    if args.output is None:
        default_rows = Path(args.rows).resolve() == (RESULTS / "high_sparsity_rows.json").resolve()
        args.output = str(RESULTS / "high_sparsity.md" if default_rows else Path(args.rows).with_suffix(".md"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("optimum_d2prune", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    set_threads(args.threads)
    try:
        configs = {**CONFIGS, **dict(parse_extra(e) for e in args.extra)}
    except ValueError as err:
        parser.error(f"--extra: {err}")
    unknown = [c for c in args.configs if c not in configs]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; known: {sorted(configs)} (add one with --extra)")
    command = recorded_command("high_sparsity.py", argv)
    protocol = protocol_from_args(args, args.rows)
    plan = list(runs(configs, args.configs, args.levels, args.seeds, args.seeded_levels, args.splits))
    if args.table:
        for name, level, seed, split in plan:
            protocol.finished(name, configs[name], level, seed, split)
    else:
        for split in args.splits:
            protocol.dense(split)
        for name, level, seed, split in plan:
            protocol.run(name, configs[name], level, seed, split)
            write_table(protocol, configs, args, command)
    if args.figure:
        drawn = draw_budgets(protocol, Path(args.output).parent / FIGURE)
        logging.info("per-block sparsity figure: %s", drawn or "no OWL run at 70 % yet")
    text = write_table(protocol, configs, args, command)
    if args.results_doc:
        regenerate = command if args.table else f"{command} --table"
        write_section("high_sparsity", results_section(text, f"{regenerate} --results-doc"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
