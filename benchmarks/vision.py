"""Vision benchmark: method x sparsity -> test top-1 and pruning seconds on the two trained digits fixtures.

Protocol: the fixtures of `optimum_d2prune.testing.digits` (a transformers DeiT and a timm ViT with fused qkv,
trained on scikit-learn's real 8x8 digits upsampled to 32x32; trained once, then cached); 128 calibration images
from the training split (seed 0, batches of 32); top-1 on the 360 held-out test images. Every method prunes a
fresh copy of the same dense weights with the same calibration images, in one process, on one CPU thread.

    python benchmarks/vision.py                                   # both fixtures, all methods, all levels
    python benchmarks/vision.py --fixtures timm --levels 0.7 --methods sparsegpt d2prune
    python benchmarks/vision.py --set skip_update=k               # config overrides for the d2prune rows
    python benchmarks/vision.py --results-doc                     # and its section of docs/results.md
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

from optimum_d2prune import D2Pruner
from optimum_d2prune.evaluation import image_accuracy
from optimum_d2prune.evaluation.image import class_logits
from optimum_d2prune.methods.d2prune.search import class_kl, describe
from optimum_d2prune.testing.digits import calibration_batches, digits_model, eval_batches, load_digits_splits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import (add_results_doc_argument, make_config, merge_overrides, parse_overrides,  # noqa: E402
                      recorded_command, write_section)


#: benchmark-only variants: (method, config overrides)
VARIANTS = {
    # per-block q/k/v choice (error + rho KL); named, since N:M patterns default to every projection updated
    "d2prune-layer": ("d2prune", {"method_options": {"skip_update": "dynamic", "strategy": "layer"}}),
    # dual-Taylor + refit, q/k/v all updated
    "d2prune-all": ("d2prune", {"method_options": {"skip_update": "none"}}),
}


def logits_on(model: torch.nn.Module, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([class_logits(model(x)) for x, _ in batches])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", nargs="+", default=["deit", "timm"], choices=["deit", "timm"])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "d2prune", "d2prune-layer"],
                        help=f"Methods, plus variants {sorted(VARIANTS)}.")
    parser.add_argument("--levels", nargs="+", default=["0.5", "0.6", "0.7", "0.8", "2:4"])
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Config override for the d2prune rows (repeatable): a config field, GROUP.NAME "
                             "(method_options.kl_weight=3), or a bare option name that belongs to one group "
                             "(skip_update=k; refit_steps, refit_tolerance and damp_percent: name the group).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models).")
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    add_results_doc_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as err:
        parser.error(f"--set: {err}")

    splits = load_digits_splits()
    calib = calibration_batches(splits, args.num_samples, args.batch_size, seed=args.seed)
    test = eval_batches(splits)
    rows, fixtures = [], {}
    for kind in args.fixtures:
        fixture = digits_model(kind, splits=splits)
        fixtures[kind] = fixture
        dense_state = copy.deepcopy(fixture.model.state_dict())
        dense = image_accuracy(fixture.model, test).top1
        reference = logits_on(fixture.model, test)
        rows.append({"fixture": kind, "method": "dense", "level": "-", "top1": dense, "seconds": 0.0})
        print(f"{kind}: dense top-1 {dense:.4f} (trained in {fixture.train_seconds:.0f} s)", file=sys.stderr)
        for level in args.levels:
            for method in args.methods:
                fixture.model.load_state_dict(dense_state)
                base, extra = VARIANTS.get(method, (method, {}))
                extra = merge_overrides(extra, overrides) if base == "d2prune" else extra
                pruner = D2Pruner(make_config({"method": base, **extra}, level))
                start = time.perf_counter()
                pruner.prune(fixture.model, calib)
                seconds = time.perf_counter() - start
                row = {"fixture": kind, "method": method, "level": level,
                       "top1": image_accuracy(fixture.model, test).top1, "seconds": seconds,
                       "kl": class_kl(reference, logits_on(fixture.model, test))}
                search = pruner.report.global_search
                if search:  # global search: the winning candidate
                    row["unupdated"] = f"global -> {describe(min(search, key=search.get))}"
                elif pruner.report.attention:
                    counts = {p: sum(a.chosen == p for a in pruner.report.attention) for p in "qkv"}
                    row["unupdated"] = "".join(f"{p}{n}" for p, n in counts.items() if n)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
        fixture.model.load_state_dict(dense_state)

    text = report(args, rows, fixtures, overrides)
    if args.results_doc:
        write_section("vision", f"{text}\n\nRerun: `{recorded_command('vision.py', argv)} --results-doc` (the "
                                "fixtures are pruned again: the seconds are a new measurement)\n")
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def report(args: argparse.Namespace, rows: list[dict], fixtures: dict, overrides: dict) -> str:
    """The fixtures, then per fixture the top-1 / seconds table and the KL table."""
    lines = [f"Digits fixtures (scikit-learn load_digits, 8x8 -> 32x32, patch 4; 1,437 train / 360 test): "
             f"{args.num_samples} calibration images (seed {args.seed}); top-1 on the test split; "
             f"{args.threads} CPU thread(s)."]
    for kind, fixture in fixtures.items():
        lines.append(f"- {kind}: {type(fixture.model).__name__}, dense top-1 {fixture.test_accuracy:.2%}, "
                     f"trained in {fixture.train_seconds:.0f} s")
    if overrides:
        lines.append(f"d2prune overrides: {overrides}")
    if "d2prune-layer" in args.methods:
        lines.append("- d2prune-layer: d2prune with `method_options.strategy='layer'` (per-block q/k/v choice by "
                     "error + rho*KL, the language-model default) instead of the global search that is the vision "
                     "default.")
    if "d2prune-all" in args.methods:
        lines.append("- d2prune-all: d2prune with `method_options.skip_update='none'` (dual-Taylor + refit, no "
                     "projection left un-updated), to separate the attention-aware choice from the rest of the "
                     "method.")
    methods = list(args.methods)
    for kind in fixtures:
        dense = next(r for r in rows if r["fixture"] == kind and r["method"] == "dense")
        lines += ["", f"**{kind}** (dense {dense['top1']:.2%}): top-1 % / pruning seconds", "",
                  "| level | " + " | ".join(methods) + " | q/k/v left un-updated |",
                  "|---|" + "---:|" * len(methods) + "---|"]
        for level in args.levels:
            cells, chosen = [], []
            for method in methods:
                r = next(r for r in rows if r["fixture"] == kind and r["method"] == method and r["level"] == level)
                cells.append(f"{100 * r['top1']:.2f} / {r['seconds']:.2f}")
                if r.get("unupdated"):
                    chosen.append(f"{method}: {r['unupdated']}")
            lines.append(f"| {level} | " + " | ".join(cells) + f" | {'; '.join(chosen)} |")
        lines += ["", f"KL(dense ‖ pruned) of the class distributions, mean over the {kind} test images:", "",
                  "| level | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
        for level in args.levels:
            cells = [f"{r['kl']:.5f}" for method in methods for r in rows
                     if r["fixture"] == kind and r["method"] == method and r["level"] == level]
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
