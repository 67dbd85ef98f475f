"""SmolLM2-135M (real weights) pruned with D²Prune through the hand-written LLaMA adapter and through the generic
path: are the masks, the q/k/v choices and the perplexity the same, and what does the generic path cost?

    python benchmarks/generic_vs_adapter.py --samples 8 --seq-len 256 --out benchmarks/results/generic_vs_adapter.json
    python benchmarks/generic_vs_adapter.py --probs-only      # time one attention_probs call, both paths

Calibration: C4 sample from ../shared/data; perplexity: WikiText-2 test windows of `--seq-len` tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.architectures import GenericAdapter, get_adapter
from optimum_d2prune.calibration import get_calibration_dataset
from optimum_d2prune.engine import PruningEngine
from optimum_d2prune.evaluation.perplexity import perplexity
from optimum_d2prune.models import load_causal_lm

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def time_attention_probs(seq_len: int, repeats: int = 20) -> dict[str, float]:
    """Milliseconds per `attention_probs` call (one sequence) on a SmolLM2-shaped LLaMA layer (random weights:
    the cost does not depend on them): the hand-written adapter vs the generic call of the eager module."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_d2prune.architectures import AttentionInputs

    config = LlamaConfig(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    attention = model.model.layers[0].self_attn
    seen = {}

    def keep(module, args, kwargs):
        seen["inputs"] = AttentionInputs(args, dict(kwargs))

    handle = attention.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, seq_len)), use_cache=False)
    handle.remove()
    weights = {"q": attention.q_proj.weight.float(), "k": attention.k_proj.weight.float()}
    out = {}
    for name, adapter in (("adapter", get_adapter(model)), ("generic", GenericAdapter())):
        adapter.validate(model)
        with torch.no_grad():
            adapter.attention_probs(attention, seen["inputs"], weights)  # warm-up
            tic = time.perf_counter()
            for _ in range(repeats):
                adapter.attention_probs(attention, seen["inputs"], weights)
        out[name] = round((time.perf_counter() - tic) / repeats * 1e3, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probs-only", action="store_true", help="Only time attention_probs (no real model).")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.probs_only:
        print(json.dumps({f"ms_per_call_seq{n}": time_attention_probs(n) for n in (256, 1024)}))
        return
    model, tokenizer = load_causal_lm("smollm2")
    dense = copy.deepcopy(model.state_dict())
    calib = get_calibration_dataset(DATA / "c4_train_sample.jsonl", tokenizer, args.samples, args.seq_len)
    config = D2PruneConfig(sparsity=0.5)
    results, masks, choices, weights = {}, {}, {}, {}
    for path in ("adapter", "generic"):
        model.load_state_dict(dense)
        adapter = GenericAdapter() if path == "generic" else get_adapter(model)
        pruner = D2Pruner(config)
        tic = time.perf_counter()
        pruner.prune(model, calib, adapter=adapter)
        seconds = time.perf_counter() - tic
        targets = [t for block in PruningEngine(config, get_adapter(model)).plan(model)[2] for t in block]
        masks[path] = {t.name: (t.weight() == 0).cpu() for t in targets}
        weights[path] = {t.name: t.weight().detach().float().cpu().clone() for t in targets}
        choices[path] = [a.chosen for a in pruner.report.attention]
        ppl = perplexity(model, tokenizer, DATA / "wikitext2_test.txt", seq_len=args.seq_len,
                         max_windows=args.eval_windows)
        results[path] = {"adapter": type(adapter).__name__, "seconds": round(seconds, 2), "ppl": round(ppl, 4)}
        print(path, results[path], flush=True)
    total = sum(m.numel() for m in masks["adapter"].values())
    differing = sum(int((masks["adapter"][n] != masks["generic"][n]).sum()) for n in masks["adapter"])
    max_weight_diff = max(float((weights["adapter"][n] - weights["generic"][n]).abs().max()) for n in weights["adapter"])
    summary = {
        "calibration": f"{args.samples} x {args.seq_len} C4 tokens", "eval": f"WikiText-2, {args.eval_windows} x "
        f"{args.seq_len}-token windows", **results,
        "mask_entries_differing": differing, "mask_entries": total,
        "max_abs_weight_difference": max_weight_diff,
        "choices_equal": choices["adapter"] == choices["generic"],
        "choices_adapter": "".join(choices["adapter"]), "choices_generic": "".join(choices["generic"]),
        "ppl_relative_difference": abs(results["generic"]["ppl"] - results["adapter"]["ppl"]) / results["adapter"]["ppl"],
        "generic_time_ratio": results["generic"]["seconds"] / results["adapter"]["seconds"],
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
