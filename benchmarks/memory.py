"""Memory benchmark: measured peak per phase vs `optimum_d2prune.memory.estimate`, on LLaMA-2-7B-shaped blocks.

Random fp32 weights (hidden 4096, intermediate 11008, 32 heads), 2 blocks, 8 x 2048 calibration tokens, CPU.
SparseGPT and D²Prune run in the same process on the same data, each from the dense weights; the measured value of
a phase is its peak process RSS minus the RSS when the run started (`PeakMemory.phase`).

    python benchmarks/memory.py                       # the 7B-shaped run (about 15-25 min on 2 cores)
    python benchmarks/memory.py --hidden 1024 --intermediate 2752 --heads 8 --samples 4 --seq-len 512   # quick
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
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.memory import estimate

GIB = 2**30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "d2prune"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                               num_hidden_layers=args.blocks, vocab_size=32000, max_position_embeddings=4096,
                               attn_implementation="sdpa")
    model = LlamaForCausalLM(model_config).eval()
    dense = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_config.vocab_size, (args.samples, args.seq_len), generator=generator)
    batches = [{"input_ids": ids[i : i + args.batch_size]} for i in range(0, args.samples, args.batch_size)]
    rows = []
    for method in args.methods:
        model.load_state_dict(dense)
        config = D2PruneConfig(method=method, sparsity=args.sparsity)
        pruner = D2Pruner(config)
        start = time.perf_counter()
        pruner.prune(model, batches)
        seconds = time.perf_counter() - start
        report = pruner.report
        predicted = estimate(model_config, config, args.samples, args.seq_len, "cpu", batch_size=args.batch_size)
        for phase, value in predicted.phases.items():
            measured = report.phase_memory_bytes.get(phase, 0)
            rows.append({"method": method, "phase": phase, "measured_gib": measured / GIB,
                         "estimate_gib": value / GIB, "ratio": value / measured if measured else float("nan")})
        rows.append({"method": method, "phase": "whole run", "measured_gib": report.memory_increase_bytes / GIB,
                     "estimate_gib": max(predicted.phases.values()) / GIB,
                     "ratio": max(predicted.phases.values()) / max(report.memory_increase_bytes, 1),
                     "seconds": seconds})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\nLLaMA-shaped blocks: hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, "
          f"{args.blocks} blocks, {args.samples} x {args.seq_len} tokens (batch {args.batch_size}), fp32 CPU, "
          f"{torch.get_num_threads()} threads; measured = peak RSS increase per phase.\n")
    print("| method | phase | measured GiB | estimate GiB | estimate / measured |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['phase']} | {r['measured_gib']:.2f} | {r['estimate_gib']:.2f} | {r['ratio']:.2f} |")
    whole = {r["method"]: r for r in rows if r["phase"] == "whole run"}
    if {"sparsegpt", "d2prune"} <= whole.keys():
        a, b = whole["d2prune"], whole["sparsegpt"]
        print(f"\nD²Prune / SparseGPT: memory increase {a['measured_gib'] / b['measured_gib']:.2f}x, "
              f"time {a['seconds'] / b['seconds']:.2f}x ({a['seconds']:.0f} s vs {b['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
