"""Chat benchmark: does a pruned chat model still answer? Dense vs pruned SmolLM2-135M-Instruct, plain-text vs chat
calibration.

Each of the 55 prompts of `chat_prompts.txt` (none of them among the calibration seed prompts of
`optimum_d2prune.calibration.chat.SEED_PROMPTS`) is formatted with the tokenizer's chat template and answered
greedily (at most `--max-new-tokens`, default 64). A reply is counted as

- **empty**: nothing but whitespace before the end of turn (the model ends its turn at once);
- **degenerate**: not empty, at least 4 tokens, and it ends in one token or a cycle of at most 8 tokens repeated at
  least three times that makes up at least half of it ("the the the", "You are a helpful AI that is a helpful AI
  that is a helpful AI that is...");
- **ok**: otherwise (this says nothing about whether the answer is right).

Rows: the dense model, then each level (`--levels`, default 50 % and 2:4) pruned with `--method` (default
d2prune) from the dense weights, calibrated on 32 x 512 tokens either of plain text (the C4 sample, SparseGPT
sampling, seed 0) or of conversations the dense model generates through its chat template (`--calibration self`
with the template, seed 0).

    python benchmarks/chat.py --threads 2                        # the full table (about 20 minutes on 2 cores)
    python benchmarks/chat.py --prompts 3 --num-samples 2 --seq-len 64 --levels 0.5 --output /tmp/chat.md  # smoke
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.calibration import get_calibration_dataset, self_generated_calibration
from optimum_d2prune.calibration.chat import ChatScript
from optimum_d2prune.models import load_causal_lm
from protocol import SHARED, add_results_doc_argument, level_kwargs, recorded_command, write_report, write_section

PROMPTS = Path(__file__).resolve().with_name("chat_prompts.txt")
RESULTS = Path(__file__).resolve().parent / "results" / "chat.md"
MAX_CYCLE, MIN_TOKENS = 8, 4


def load_prompts(limit: int | None = None) -> list[str]:
    prompts = [line.strip() for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts


def classify(tokens: list[int], text: str) -> str:
    """"empty", "degenerate" or "ok" (see the module docstring)."""
    if not text.strip():
        return "empty"
    for period in range(1, MAX_CYCLE + 1):
        repeated = _periodic_suffix(tokens, period)
        if len(tokens) >= MIN_TOKENS and repeated >= 3 * period and 2 * repeated >= len(tokens):
            return "degenerate"
    return "ok"


def _periodic_suffix(tokens: list[int], period: int) -> int:
    """Length of the longest end of `tokens` in which every token equals the one `period` later."""
    if len(tokens) < period:
        return 0
    length = period
    while length < len(tokens) and tokens[-length - 1] == tokens[-length - 1 + period]:
        length += 1
    return length


@torch.no_grad()
def replies(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[tuple[list[int], str]]:
    """Greedy replies `(new token ids without the end token, decoded text)`, one prompt at a time."""
    from transformers import GenerationConfig

    stop = sorted(ChatScript(tokenizer, _eos(model)).stop_ids)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new = [t for t in generated[0, ids.shape[1] :].tolist() if t not in stop]
        out.append((new, tokenizer.decode(new, skip_special_tokens=True)))
    return out


def _eos(model) -> list[int]:
    value = getattr(model.generation_config, "eos_token_id", None)
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def row(name: str, calibration: str, answers: list[tuple[list[int], str]], seconds: float) -> dict:
    kinds = [classify(tokens, text) for tokens, text in answers]
    return {"model": name, "calibration": calibration, "empty": kinds.count("empty"),
            "degenerate": kinds.count("degenerate"), "ok": kinds.count("ok"), "prompts": len(kinds),
            "mean_tokens": sum(len(t) for t, _ in answers) / len(answers), "seconds": seconds,
            "examples": [text for _, text in answers[:3]]}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# Chat replies of dense and pruned {args.model}", "",
             f"{rows[0]['prompts']} prompts of benchmarks/chat_prompts.txt, greedy, at most {args.max_new_tokens} new "
             f"tokens; pruned with {args.method} on {args.num_samples} x {args.seq_len} calibration tokens (seed "
             f"{args.seed}); torch threads: {torch.get_num_threads()}. Empty: whitespace only before the end of turn. "
             f"Degenerate: it ends in one token or a cycle of at most {MAX_CYCLE} tokens repeated at least three "
             "times, covering at least half of it.",
             "", "| model | calibration | empty | degenerate | ok | mean reply tokens | prune s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['calibration']} | {r['empty']} | {r['degenerate']} | {r['ok']} | "
                     f"{r['mean_tokens']:.1f} | {r['seconds']:.0f} |")
    lines += ["", "First replies of each row:", ""]
    for r in rows:
        shown = " / ".join(repr(e[:80]) for e in r["examples"])
        lines.append(f"- {r['model']}, {r['calibration']}: {shown}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--c4", default=str(SHARED / "c4_train_sample.jsonl"), help="The plain-text calibration file.")
    parser.add_argument("--levels", nargs="+", default=["0.5", "2:4"])
    parser.add_argument("--method", default="d2prune")
    parser.add_argument("--calibrations", nargs="+", default=["c4", "chat"], choices=["c4", "chat"])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=None, help="Only the first prompts (a smoke test).")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=str(RESULTS))
    add_results_doc_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    dense, tokenizer = load_causal_lm(args.model)
    dense.eval()
    prompts = load_prompts(args.prompts)
    rows = [row("dense", "-", replies(dense, tokenizer, prompts, args.max_new_tokens), 0.0)]
    calibration = {}
    if "c4" in args.calibrations:
        calibration["C4 (plain text)"] = get_calibration_dataset(args.c4, tokenizer, args.num_samples, args.seq_len,
                                                                 seed=args.seed)
    if "chat" in args.calibrations:
        calibration["self, chat template"] = self_generated_calibration(dense, tokenizer, args.num_samples,
                                                                        args.seq_len, seed=args.seed, chat="on")
    for level in args.levels:
        for name, batches in calibration.items():
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            D2Pruner(D2PruneConfig(method=args.method, **level_kwargs(level))).prune(model, batches)
            seconds = time.perf_counter() - start
            rows.append(row(f"{args.method} {level}", name, replies(model, tokenizer, prompts, args.max_new_tokens),
                            seconds))
            del model
    text = write_report(table(rows, args), args.output)
    print(text)
    if args.results_doc:
        body = text.split("\n", 1)[1].strip()  # without the title: the page's heading says what it is
        write_section("chat", f"{body}\n\nRegenerate: `{recorded_command('chat.py', argv)} --results-doc`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
