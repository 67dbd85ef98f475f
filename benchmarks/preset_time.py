"""Pruning time of high-sparsity configurations, back to back in one process (the preset's budget: 3x SparseGPT).

The seconds in `high_sparsity.md` come from sweeps that share the cores with other runs; a timing claim needs the
configs of one level pruned one after the other on an idle machine, in one process, on the same calibration draw.
This script does that: BENCH.md v1 (SmolLM2-135M, 32 x 512 C4 tokens of the given seed), `prune()` only (loading and
evaluation excluded), the dense weights restored between runs. Names are `high_sparsity.py`'s configs; name one
twice (first and last) to see how far the machine drifts during the run. Ratios are to the mean of the SparseGPT
runs.

    python benchmarks/preset_time.py --threads 2    # SparseGPT, max_quality, its SparseGPT version, SparseGPT
    python benchmarks/preset_time.py --threads 2 --results-doc      # and its section of docs/results.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

from high_sparsity import CONFIGS
from protocol import (Protocol, ProtocolSettings, add_results_doc_argument, make_config, recorded_command, set_threads,
                      write_report, write_section)

from optimum_d2prune import D2Pruner


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), metavar="CONFIG",
                        default=["sparsegpt", "max_quality", "sparsegpt+max_quality", "sparsegpt"])
    parser.add_argument("--level", default="0.7", help="0.5 ... or N:M (default 0.7).")
    parser.add_argument("--seed", type=int, default=0, help="Calibration seed (BENCH.md v1 draw).")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="Also write the table to this file.")
    add_results_doc_argument(parser)
    args = parser.parse_args(argv)
    if "sparsegpt" not in args.configs:
        parser.error("list `sparsegpt` among --configs: the ratios are to its time")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("optimum_d2prune", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    set_threads(args.threads)
    protocol = Protocol(ProtocolSettings())
    calibration = protocol.calibration("bench", args.seed)
    seconds: list[tuple[str, float]] = []
    for name in args.configs:
        model = protocol.dense_model()
        config = make_config(CONFIGS[name], args.level)
        start = time.perf_counter()
        D2Pruner(config).prune(model, calibration)
        seconds.append((name, time.perf_counter() - start))
        logging.info("%s: %.1f s", name, seconds[-1][1])
    base = statistics.mean(s for n, s in seconds if n == "sparsegpt")
    lines = [f"Pruning time at {args.level}, calibration seed {args.seed}, {args.threads or 'default'} torch "
             "thread(s), one process, in this order:", "", "| run | config | prune s | x SparseGPT (mean) |",
             "|---:|---|---:|---:|"]
    lines += [f"| {i + 1} | {n} | {s:.1f} | {s / base:.2f} |" for i, (n, s) in enumerate(seconds)]
    text = write_report("\n".join(lines) + "\n", args.output)
    if args.results_doc:
        write_section("preset_time", f"{text}\nRerun: `{recorded_command('preset_time.py', argv)} --results-doc` "
                                     "(an idle machine; the seconds are a new measurement)\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
