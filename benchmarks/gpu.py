r"""GPU benchmark for a lent H200/A100: LLaMA-2-7B-shaped pruning time, and 2:4 linear latency dense vs sparse.

Random weights in bf16 (LLaMA-2-7B shapes: hidden 4096, MLP 11008, 32 heads, 32 layers), 128 x 2048 calibration
tokens of random ids. Prints seconds per block and total for SparseGPT and D²Prune (dynamic, layer strategy),
then the latency of a 4096x11008 Linear dense vs `to_semi_structured` after 2:4 pruning.

    python benchmarks/gpu.py                       # the full protocol (needs ~40 GB of GPU memory)
    python benchmarks/gpu.py --layers 2 --samples 4 --seq-len 128 --hidden 256 --intermediate 688 --device cpu \
        --dtype float32 --profile                                  # CPU smoke test (seconds)
    python benchmarks/gpu.py --layers 8 --profile                 # 8 blocks (s/block and 32-block estimate),
                                                                  # plus a torch.profiler table of one block
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from optimum_d2prune import D2PruneConfig, D2Pruner, to_semi_structured


def build_model(layers: int, device: str, dtype: torch.dtype, hidden: int = 4096, intermediate: int = 11008):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = hidden // 128
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=32000,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def linear_latency(device: str, iters: int = 200) -> None:
    from torch import nn

    from optimum_d2prune.masks import nm_mask

    linear = nn.Linear(4096, 11008, bias=False, device=device, dtype=torch.float16)
    with torch.no_grad():
        linear.weight[nm_mask(linear.weight.abs().float(), 2, 4)] = 0
    x = torch.randn(2048, 4096, device=device, dtype=torch.float16)
    results = {}
    for label in ("dense", "2:4"):
        if label == "2:4":
            to_semi_structured(linear)
        with torch.no_grad():
            for _ in range(20):
                linear(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                linear(x)
            torch.cuda.synchronize()
        results[label] = (time.perf_counter() - start) / iters * 1e3
    print(f"\nLinear 4096->11008, 2048 tokens, fp16: dense {results['dense']:.3f} ms, 2:4 {results['2:4']:.3f} ms, "
          f"speed-up {results['dense'] / results['2:4']:.2f}x")


def profile_block(args, dtype: torch.dtype, method: str = "d2prune", rows: int = 25) -> None:
    """torch.profiler table (self device time) of pruning one block, after a warm-up block."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 32000, (1, args.seq_len), generator=g) for _ in range(args.samples)]
    # warm-up (kernels, allocator) on a throwaway block, then profile a fresh dense one
    D2Pruner(D2PruneConfig(sparsity=0.5, method=method)).prune(
        build_model(1, args.device, dtype, args.hidden, args.intermediate), calib)
    model = build_model(1, args.device, dtype, args.hidden, args.intermediate)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        D2Pruner(D2PruneConfig(sparsity=0.5, method=method)).prune(model, calib)
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(f"\nProfile of one {method} block ({args.samples} x {args.seq_len} tokens), by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "d2prune"])
    parser.add_argument("--hidden", type=int, default=4096, help="Hidden size (smaller only for smoke tests).")
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--profile", action="store_true", help="Also print a torch.profiler table of one block.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 32000, (1, args.seq_len), generator=g) for _ in range(args.samples)]
    print(f"LLaMA-shaped model (hidden {args.hidden}, MLP {args.intermediate}), {args.layers} layers, {args.dtype}, "
          f"{args.samples} x {args.seq_len} tokens")
    print("| method | total s | s / block | 32-block estimate s | peak GiB | model GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in args.methods:
        model = build_model(args.layers, args.device, dtype, args.hidden, args.intermediate)
        pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method=method))
        pruner.prune(model, calib)
        r = pruner.report
        model_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        print(f"| {method} | {r.seconds:.1f} | {r.seconds / args.layers:.2f} | {32 * r.seconds / args.layers:.0f} "
              f"| {r.peak_memory_bytes / 2**30:.1f} | {model_gib:.1f} |", flush=True)
        del model, pruner
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.device.startswith("cuda"):
        linear_latency(args.device)
    if args.profile:
        profile_block(args, dtype)


if __name__ == "__main__":
    main()
