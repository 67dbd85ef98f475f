"""Memory benchmark: measured peak per phase vs `optimum_d2prune.memory.estimate`, on LLaMA-2-7B-shaped blocks.

Random fp32 weights (hidden 4096, intermediate 11008, 32 heads), 2 blocks, 8 x 2048 calibration tokens, CPU.
SparseGPT and D²Prune run in the same process on the same data, each from the dense weights; the measured value of
a phase is its peak above the start of the run (`PeakMemory.phase`), counted in live tensor bytes (`--measure
tensors`, the default: exact, like CUDA's allocator statistics, but every op is seen, so the run is slower and
its time is not a timing) or in sampled process RSS (`--measure rss`: also a timing).

    python benchmarks/memory.py                       # the 7B-shaped memory check (about 20-30 min on 2 cores)
    python benchmarks/memory.py --measure rss --blocks 1 --samples 4 --batch-size 4 --kl-samples 2
                                                      # the 7B-shaped time (and RSS) check
    python benchmarks/memory.py --hidden 1024 --intermediate 2752 --heads 8 --samples 4 --seq-len 512   # quick
    python benchmarks/memory.py --estimate-table      # the estimates for 7B-70B (nothing is run)
    python benchmarks/memory.py --moe --blocks 1       # a Qwen3-30B-A3B-shaped MoE block (128 experts, top 8)
    python benchmarks/memory.py --table-from benchmarks/results/memory_rows.json    # a stored run's table
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

from optimum_d2prune import D2PruneConfig, D2Pruner, RuntimeOptions
from optimum_d2prune.architectures import get_adapter
from optimum_d2prune.calibration.batches import prepare_batches
from optimum_d2prune.memory.estimate import RunShape, estimate
from optimum_d2prune.pipeline.engine import PruningEngine
from optimum_d2prune.testing.memory_counter import LiveTensorBytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import add_results_doc_argument, recorded_command, write_section  # noqa: E402

GIB = 2**30
#: published shapes (bf16 checkpoints) for the estimate table
BIG_MODELS: dict[str, dict] = {
    "LLaMA-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "LLaMA-2-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
    "LLaMA-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
    "Qwen3-30B-A3B (MoE)": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                                num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
                                num_key_value_heads=4, head_dim=128, vocab_size=151936),
}


def estimate_table(samples: int = 128, seq_len: int = 2048) -> str:
    """Estimated peaks of D²Prune (defaults) at `samples x seq_len` in bf16 on a GPU, three placements."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = D2PruneConfig()
    offload = config.replace(runtime=RuntimeOptions(offload_activations=True))
    run, offloaded_run = RunShape.of(config, samples, seq_len), RunShape.of(offload, samples, seq_len)
    lines = [f"D²Prune defaults, {samples} x {seq_len} calibration tokens, bf16 weights, fp32 statistics "
             "(`optimum_d2prune.memory.estimate`).", "",
             "| model (bf16) | whole model on the GPU: weights + pruning peak | fits 80 GB / 141 GB | blocks onloaded "
             "(`device=\"cuda\"`, model in CPU RAM) | + `offload_activations` |", "|---|---:|---|---:|---:|"]
    for name, shape in BIG_MODELS.items():
        moe = "num_experts" in shape
        model_config = (Qwen3MoeConfig if moe else LlamaConfig)(**shape)
        with torch.device("meta"):  # shapes only: no memory
            model = (Qwen3MoeForCausalLM if moe else LlamaForCausalLM)(model_config)
        weights = sum(p.numel() for p in model.parameters()) * 2
        whole = estimate(model_config, run, "cuda", dtype=torch.bfloat16, model_on_device=True)
        onloaded = estimate(model_config, run, "cuda", dtype=torch.bfloat16, model_on_device=False)
        offloaded = estimate(model_config, offloaded_run, "cuda", dtype=torch.bfloat16, model_on_device=False)
        total = weights + whole.peak
        fits = " / ".join("yes" if total <= gb * 10**9 else "no" for gb in (80, 141))
        lines.append(f"| {name} | {weights / GIB:.1f} + {whole.peak / GIB:.1f} = {total / GIB:.1f} GiB | {fits} | "
                     f"{onloaded.peak / GIB:.1f} GiB | {offloaded.peak / GIB:.1f} GiB |")
    return "\n".join(lines)


def format_rows(rows: list[dict], timing: bool = False) -> str:
    """The measured-vs-estimated table of a run's rows, and D²Prune's whole run against SparseGPT's (`timing`: the
    seconds were measured without the live-tensor counter)."""
    lines = ["| method | phase | measured GiB | estimate GiB | estimate / measured |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['phase']} | {r['measured_gib']:.2f} | {r['estimate_gib']:.2f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    whole = {r["method"]: r for r in rows if r["phase"] == "whole run"}
    if {"sparsegpt", "d2prune"} <= whole.keys():
        a, b = whole["d2prune"], whole["sparsegpt"]
        lines += ["", f"D²Prune / SparseGPT: memory increase {a['measured_gib'] / b['measured_gib']:.2f}x, "
                  f"time {a['seconds'] / b['seconds']:.2f}x ({a['seconds']:.0f} s vs {b['seconds']:.0f} s)"
                  + (" (a timing: --measure rss)" if timing else "")]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--moe", action="store_true",
                        help="Qwen3-MoE blocks shaped like Qwen3-30B-A3B (hidden 2048, 32 heads / 4 KV heads of 128, "
                             "128 experts of 768, top 8) instead of LLaMA ones; --hidden etc. are then ignored.")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "d2prune"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--kl-samples", type=int, default=None,
                        help="D²Prune's `method_options.kl_samples` (default: the library's, 4).")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--measure", choices=("tensors", "rss"), default="tensors")
    parser.add_argument("--json", default=None)
    parser.add_argument("--estimate-table", action="store_true", help="Print the estimate table and exit.")
    parser.add_argument("--table-from", default=None, metavar="JSON",
                        help="Print the table of a --json rows file and exit.")
    add_results_doc_argument(parser)
    args = parser.parse_args(argv)
    if args.estimate_table or args.table_from:
        text = estimate_table() if args.estimate_table else format_rows(json.loads(Path(args.table_from).read_text()))
        if args.results_doc:
            name = "memory_estimate" if args.estimate_table else Path(args.table_from).stem  # e.g. memory_rows
            write_section(name, f"{text}\n\nRegenerate: `{recorded_command('memory.py', argv)} --results-doc`\n")
        print(text)
        return 0
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.moe:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        shape = {**BIG_MODELS["Qwen3-30B-A3B (MoE)"], "num_hidden_layers": args.blocks, "vocab_size": 32000}
        model_config = Qwen3MoeConfig(**shape, max_position_embeddings=4096, attn_implementation="sdpa")
        model = Qwen3MoeForCausalLM(model_config).eval()
        title = "Qwen3-30B-A3B-shaped MoE blocks (hidden 2048, 32/4 heads, 128 experts of 768, top 8)"
    else:
        model_config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                                   num_hidden_layers=args.blocks, vocab_size=32000, max_position_embeddings=4096,
                                   attn_implementation="sdpa")
        model = LlamaForCausalLM(model_config).eval()
        title = (f"LLaMA-shaped blocks: hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads")
    dense = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_config.vocab_size, (args.samples, args.seq_len), generator=generator)
    batches = [{"input_ids": ids[i : i + args.batch_size]} for i in range(0, args.samples, args.batch_size)]
    rows = []
    for method in args.methods:
        model.load_state_dict(dense)
        options = {"kl_samples": args.kl_samples} if args.kl_samples and method == "d2prune" else None
        config = D2PruneConfig(method=method, sparsity=args.sparsity, method_options=options)
        start = time.perf_counter()
        if args.measure == "tensors":  # the engine's one run, as `D2Pruner.prune` makes it, with the counter
            prepared = prepare_batches(batches, model)
            with LiveTensorBytes() as counter:
                engine = PruningEngine(config, get_adapter(model), memory_counter=counter)
                report = engine.run(model, prepared, engine.plan(model), engine.make_method())
        else:
            pruner = D2Pruner(config)
            pruner.prune(model, batches)
            report = pruner.report
        seconds = time.perf_counter() - start
        predicted = estimate(model_config, RunShape.of(config, args.samples, args.seq_len, args.batch_size), "cpu")
        for phase, value in predicted.phases.items():
            measured = report.phase_memory_bytes.get(phase, 0)
            rows.append({"method": method, "phase": phase, "measured_gib": measured / GIB,
                         "estimate_gib": value / GIB, "ratio": value / measured if measured else float("nan")})
        rows.append({"method": method, "phase": "whole run", "measured_gib": report.memory_increase_bytes / GIB,
                     "estimate_gib": max(predicted.phases.values()) / GIB,
                     "ratio": max(predicted.phases.values()) / max(report.memory_increase_bytes, 1),
                     "seconds": seconds})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\n{title}, {args.blocks} blocks, {args.samples} x {args.seq_len} tokens (batch {args.batch_size}), fp32 CPU, "
          f"{torch.get_num_threads()} threads; measured = peak increase per phase, "
          f"{'live tensor bytes' if args.measure == 'tensors' else 'process RSS'}.\n")
    print(format_rows(rows, timing=args.measure == "rss"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
