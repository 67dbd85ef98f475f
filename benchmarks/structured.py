r"""Structured pruning benchmark: SmolLM2 shrunk to smaller dense models, quality, size and CPU speed.

Protocol: SmolLM2-135M-Instruct (`load_causal_lm("smollm2")`), 32 x 512 calibration tokens of
`c4_train_sample.jsonl` (SparseGPT sampling, seed 0; `get_calibration_dataset`). Two splits (BENCH.md): "bench"
calibrates on every document and scores the first 32 x 512-token windows of WikiText-2 test; "dev" calibrates on
documents 0-699 and scores documents 700-799 (first 32 x 512 windows). Each mode (MLP channels, attention heads =
whole key/value groups, whole blocks) at 10/20/30 % of the block parameters (heads: the nearest expressible ratios,
1 and 2 of SmolLM2's 3 key/value groups = 8.3 % and 16.7 %; 30 % cannot be expressed and is skipped), with D²Prune's
saliency with and without compensation, the baselines (Wanda-style group sums, magnitude, FLAP), and D²Prune followed
by the recovery distillation. References: the dense model and a 50 % unstructured D²Prune model (same file size and
speed as dense: the zeros are stored). Zero-shot accuracy (HellaSwag and ARC-e, first 500 examples, local copies of
the tasks) of every model of the first split, read back from its saved folder.

Per shrunk shape (every method of a (mode, ratio) gives the same shapes), CPU speed in plain transformers: prefill
tokens/s of one 512-token sequence and decode tokens/s (greedy, KV cache, after a 64-token prompt) at batch 1 and 8,
in float32 and bfloat16, all models in one process, the order rotated every round, median of `--speed-runs` rounds;
file size of the saved safetensors. Rows are stored in `--rows` as they finish: an interrupted run resumes.

Full run (needs an otherwise idle machine; several hours on 1 thread; `--work-dir` keeps the checkpoints, so an
interrupted run resumes without redoing finished rows):

    python benchmarks/structured.py --threads 1 --work-dir /tmp/structured-work

Smoke test (tiny sizes, a few minutes):

    python benchmarks/structured.py --threads 1 --num-samples 2 --seq-len 64 --eval-windows 2 --modes channels \
        --ratios 0.1 --methods d2prune --recovery-steps 1 --speed-runs 1 --prefill-tokens 32 --decode-tokens 2 \
        --zero-shot-limit 4 --rows /tmp/structured_rows.json --output /tmp/structured.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import inspect
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import (DEV_CALIBRATION_DOCS, DEV_EVAL_DOCS, SHARED, add_results_doc_argument,  # noqa: E402
                      recorded_command, set_threads, write_report, write_section)

from optimum_d2prune import D2PruneConfig, D2Pruner  # noqa: E402
from optimum_d2prune.calibration import get_calibration_dataset  # noqa: E402
from optimum_d2prune.evaluation import perplexity  # noqa: E402
from optimum_d2prune.evaluation.zeroshot import zero_shot  # noqa: E402
from optimum_d2prune.models import load_causal_lm  # noqa: E402
from optimum_d2prune.structured import StructuredConfig, save_shrunk, shrink, valid_ratios  # noqa: E402
from optimum_d2prune.structured.recovery import RecoveryConfig, distill  # noqa: E402

logger = logging.getLogger("structured")
RESULTS = Path(__file__).resolve().parent / "results"
#: row variants per mode: name -> StructuredConfig fields (besides mode and ratio) and whether recovery follows
VARIANTS: dict[str, list[tuple[str, dict, bool]]] = {
    "channels": [("d2prune", {"saliency": "d2prune"}, False), ("d2prune+recovery", {"saliency": "d2prune"}, True),
                 ("d2prune-comp", {"saliency": "d2prune", "compensation": "none"}, False),
                 ("wanda", {"saliency": "wanda"}, False), ("magnitude", {"saliency": "magnitude"}, False),
                 ("flap", {"saliency": "flap"}, False)],
    "blocks": [("block_influence", {"saliency": "block_influence"}, False),
               ("block_influence+recovery", {"saliency": "block_influence"}, True),
               ("angular", {"saliency": "angular"}, False)],
}
VARIANTS["heads"] = VARIANTS["channels"]
#: the farthest a requested ratio may be from the nearest expressible one before the (mode, ratio) is skipped
RATIO_SLACK = 0.05


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--calibration", default=str(SHARED / "c4_train_sample.jsonl"))
    parser.add_argument("--eval", default=str(SHARED / "wikitext2_test.txt"))
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--splits", nargs="+", default=["bench", "dev"], choices=["bench", "dev"])
    parser.add_argument("--modes", nargs="+", default=["channels", "heads", "blocks"],
                        choices=["channels", "heads", "blocks"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--methods", nargs="+", default=None, help="Only these row variants (names of VARIANTS).")
    parser.add_argument("--recovery-steps", type=int, default=50, help="Distillation steps (0: no recovery rows).")
    parser.add_argument("--recovery-lr", type=float, default=1e-4)
    parser.add_argument("--no-unstructured", action="store_true", help="Skip the 50 %% unstructured reference.")
    parser.add_argument("--zero-shot", nargs="*", default=["hellaswag", "arc_easy"],
                        help="lm-eval tasks scored on the models of the first split (none: no zero-shot columns).")
    parser.add_argument("--zero-shot-limit", type=int, default=500, help="First N examples of each task.")
    parser.add_argument("--zero-shot-data", default=str(SHARED / "zeroshot"),
                        help="Local copies of the tasks (one folder per task, as docs/hub.md lays out).")
    parser.add_argument("--speed-runs", type=int, default=5, help="Rounds of the speed measurement (0: no speed).")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", default=None, help="Where the checkpoints are saved (default: a temporary "
                                                         "folder, removed at the end).")
    parser.add_argument("--rows", default=str(RESULTS / "structured_rows.json"))
    parser.add_argument("--output", default=str(RESULTS / "structured.md"))
    add_results_doc_argument(parser)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ rows on disk
class Rows:
    """Finished rows by key, written after each one (an interrupted run resumes); refused if the settings differ."""

    def __init__(self, path: str, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.settings = settings
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("settings") != settings:
                raise SystemExit(f"{self.path} holds rows of other settings: use another --rows file.")
            self.rows = {r["key"]: r for r in data["rows"]}

    def get(self, key: str) -> Optional[dict]:
        return self.rows.get(key)

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "rows": list(self.rows.values())}, indent=1) + "\n")
        tmp.replace(self.path)


# ------------------------------------------------------------------------------------------------- quality
class Bench:
    """The loaded dense model, calibration per split, scoring, and the saved checkpoints of each shape."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.dense, self.tokenizer = load_causal_lm(args.model)
        self._calibration: dict[str, list] = {}

    def calibration(self, split: str) -> list:
        if split not in self._calibration:
            documents = DEV_CALIBRATION_DOCS if split == "dev" else None
            self._calibration[split] = get_calibration_dataset(self.args.calibration, self.tokenizer,
                                                               self.args.num_samples, self.args.seq_len, seed=0,
                                                               documents=documents)
        return self._calibration[split]

    def score(self, model: torch.nn.Module, split: str) -> float:
        a = self.args
        if split == "dev":
            return perplexity(model, self.tokenizer, a.calibration, seq_len=a.seq_len, max_windows=a.eval_windows,
                              documents=DEV_EVAL_DOCS, desc="dev PPL")
        return perplexity(model, self.tokenizer, a.eval, seq_len=a.seq_len, max_windows=a.eval_windows,
                          desc="WikiText-2 PPL")

    def save(self, model: torch.nn.Module, name: str, report: Any = None) -> tuple[str, int]:
        """Save `model` under the work folder; returns (folder, safetensors bytes)."""
        folder = self.work / name
        if report is not None:
            save_shrunk(model, folder, report, overwrite=True)
        else:
            model.save_pretrained(folder)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        return str(folder), size


def resolve_ratio(model: torch.nn.Module, mode: str, ratio: float) -> Optional[float]:
    """The expressible ratio nearest to `ratio`, or None when it is farther than `RATIO_SLACK`."""
    valid = valid_ratios(model, mode)
    best = min(valid, key=lambda r: abs(r - ratio))
    return best if abs(best - ratio) <= RATIO_SLACK else None


def run_row(bench: Bench, split: str, mode: str, ratio: float, variant: tuple[str, dict, bool]) -> dict:
    name, fields, recover = variant
    model = copy.deepcopy(bench.dense)
    calib = bench.calibration(split)
    started = time.perf_counter()
    report = shrink(model, calib, StructuredConfig(mode=mode, ratio=ratio, **fields))
    seconds = time.perf_counter() - started
    row = {"split": split, "mode": mode, "ratio": ratio, "name": name, "achieved_ratio": report.achieved_ratio,
           "saliency": report.saliency, "compensation": report.compensation, "params": report.params_after,
           "shrink_s": round(seconds, 1), "config_changes": {k: list(v) for k, v in report.config_changes.items()},
           "removed_blocks": report.removed_blocks, "mean_layer_error": report.mean_error()}
    if recover:
        result = distill(model, bench.dense, calib,
                         RecoveryConfig(steps=bench.args.recovery_steps, learning_rate=bench.args.recovery_lr),
                         layer_map=report.kept_blocks)
        row.update(recovery_steps=result.steps, recovery_s=round(result.seconds, 1),
                   recovery_loss=[result.losses[0], result.losses[-1]])
    row["ppl"] = bench.score(model, split)
    row["folder"], row["bytes"] = bench.save(model, f"{split}-{mode}-{ratio:.4f}-{name}", report)
    del model
    gc.collect()
    return row


def reference_rows(bench: Bench, split: str, store: Rows) -> None:
    if store.get(f"{split}|dense") is None:
        folder, size = bench.save(bench.dense, "dense")
        store.add({"key": f"{split}|dense", "split": split, "mode": "-", "ratio": 0.0, "name": "dense",
                   "params": sum(p.numel() for p in bench.dense.parameters()), "ppl": bench.score(bench.dense, split),
                   "folder": folder, "bytes": size})
    if not bench.args.no_unstructured and store.get(f"{split}|unstructured-50") is None:
        model = copy.deepcopy(bench.dense)
        started = time.perf_counter()
        D2Pruner(D2PruneConfig(sparsity=0.5)).prune(model, bench.calibration(split))
        seconds = time.perf_counter() - started
        folder, size = bench.save(model, f"{split}-unstructured-50")
        store.add({"key": f"{split}|unstructured-50", "split": split, "mode": "unstructured", "ratio": 0.5,
                   "name": "d2prune 50% unstructured", "params": sum(p.numel() for p in model.parameters()),
                   "ppl": bench.score(model, split), "folder": folder, "bytes": size, "shrink_s": round(seconds, 1)})


def zero_shot_rows(bench: Bench, store: Rows, split: str) -> None:
    """Zero-shot accuracy (`--zero-shot` tasks, first `--zero-shot-limit` examples) of each saved model of `split`
    that has none yet, read back from its folder with plain `from_pretrained`."""
    from transformers import AutoModelForCausalLM

    args = bench.args
    wanted = {"tasks": list(args.zero_shot), "limit": args.zero_shot_limit}
    for row in [r for r in store.rows.values() if r["split"] == split]:
        if row.get("zero_shot", {}).get("settings") == wanted or not Path(row["folder"]).is_dir():
            continue
        model = AutoModelForCausalLM.from_pretrained(row["folder"], dtype=torch.float32).eval()
        results = zero_shot(model, bench.tokenizer, list(args.zero_shot), data_dir=args.zero_shot_data,
                            limit=args.zero_shot_limit)
        row["zero_shot"] = {"settings": wanted, "scores": results.scores(), "samples": results.samples}
        store.add(row)
        del model
        gc.collect()


# --------------------------------------------------------------------------------------------------- speed
def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@torch.no_grad()
def measure_speed(model: torch.nn.Module, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    """Prefill tokens/s of one `--prefill-tokens` sequence; decode tokens/s at each batch size."""
    g = torch.Generator().manual_seed(0)
    out = {}
    # transformers >= 5.2x names the KV cache `cache` (input and output); earlier versions `past_key_values`
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prompt = torch.randint(3, vocab, (1, args.prefill_tokens), generator=g)
    out["prefill"] = args.prefill_tokens / _time(lambda: model(input_ids=prompt, use_cache=False))
    for batch in args.decode_batches:
        ids = torch.randint(3, vocab, (batch, 64), generator=g)
        state = model(input_ids=ids, use_cache=True)

        def decode(state=state) -> None:
            past, token = getattr(state, cache), state.logits[:, -1:].argmax(-1)
            for _ in range(args.decode_tokens):
                step = model(input_ids=token, use_cache=True, **{cache: past})
                past, token = getattr(step, cache), step.logits[:, -1:].argmax(-1)

        out[f"decode_b{batch}"] = batch * args.decode_tokens / _time(decode)
    return out


def speed_table(folders: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median tokens/s per model and dtype: every model once per round, the order rotated every round."""
    from transformers import AutoModelForCausalLM

    names = list(folders)
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for dtype in args.dtypes:
        for r in range(args.speed_runs):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                model = AutoModelForCausalLM.from_pretrained(folders[name], dtype=getattr(torch, dtype)).eval()
                for metric, value in measure_speed(model, args, model.config.vocab_size).items():
                    samples[name].setdefault(f"{metric}_{dtype}", []).append(value)
                del model
                gc.collect()
    return {n: {k: statistics.median(v) for k, v in m.items()} for n, m in samples.items()}


# --------------------------------------------------------------------------------------------------- tables
def format_report(rows: list[dict], speed: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    lines = [f"# Structured pruning on SmolLM2-135M ({datetime.date.today().isoformat()})", "",
             f"`python benchmarks/structured.py {' '.join(sys.argv[1:])}`; {args.num_samples} x {args.seq_len} "
             f"calibration tokens (seed 0), PPL on the first {args.eval_windows} x {args.seq_len}-token windows; "
             f"{args.threads} torch thread(s). Ratio: fraction of the block parameters removed (achieved). "
             "-comp: without compensation; +recovery: followed by "
             f"{args.recovery_steps} distillation steps (lr {args.recovery_lr:g}) on the calibration batches.", ""]
    for split in args.splits:
        dense = next((r for r in rows if r["split"] == split and r["name"] == "dense"), None)
        title = "WikiText-2 (bench calibration)" if split == "bench" else "dev split (C4 docs 700-799)"
        tasks = [t for t in (args.zero_shot or []) if any("zero_shot" in r for r in rows if r["split"] == split)]
        lines += [f"## Quality: {title}", ""]
        if tasks:
            lines += [f"Zero-shot: accuracy on the first {args.zero_shot_limit} examples of each task (acc_norm for "
                      "HellaSwag), lm-eval on the local copies of the tasks, each model read back from its folder.",
                      ""]
        lines += ["| mode | ratio | method | compensation | params M | file MB | PPL | PPL/dense | "
                  + "".join(f"{t} | " for t in tasks) + "shrink s |",
                  "|---|---:|---|---|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|"]
        for r in (r for r in rows if r["split"] == split):
            rel = r["ppl"] / dense["ppl"] if dense else float("nan")
            scores = r.get("zero_shot", {}).get("scores", {})
            cells = "".join(f"{scores[t]:.3f} | " if t in scores else "- | " for t in tasks)
            lines.append(f"| {r['mode']} | {r.get('achieved_ratio', r['ratio']):.3f} | {r['name']} | "
                         f"{r.get('compensation', '-')} | {r['params'] / 1e6:.1f} | {r['bytes'] / 2**20:.1f} | "
                         f"{r['ppl']:.2f} | {rel:.3f} | {cells}{r.get('shrink_s', 0) + r.get('recovery_s', 0):.0f} |")
        lines.append("")
    if speed:
        kinds = ["prefill"] + [f"decode_b{b}" for b in args.decode_batches]
        metrics = [f"{m}_{d}" for d in args.dtypes for m in kinds]
        dense = speed.get("dense", {})
        lines += ["## CPU speed (tokens/s, median; x dense)", "",
                  f"Prefill: one {args.prefill_tokens}-token sequence; decode: {args.decode_tokens} greedy steps with "
                  "the KV cache after a 64-token prompt. Every method of a (mode, ratio) has the same shapes.", "",
                  "| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
        for name, values in speed.items():
            cells = [f"{values[m]:.1f} ({values[m] / dense[m]:.2f}x)" if m in dense else f"{values[m]:.1f}"
                     for m in metrics]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k in ("model", "calibration", "eval", "num_samples", "seq_len",
                                                             "eval_windows", "recovery_steps", "recovery_lr")}
    store = Rows(args.rows, settings)
    temporary = None if args.work_dir else tempfile.TemporaryDirectory(prefix="structured-")
    work = Path(args.work_dir or temporary.name)
    try:
        bench = Bench(args, work)
        shapes: dict[str, str] = {}
        for split in args.splits:
            reference_rows(bench, split, store)
            for mode in args.modes:
                for requested in args.ratios:
                    ratio = resolve_ratio(bench.dense, mode, requested)
                    if ratio is None:
                        logger.info("%s at %.0f %% is not expressible on this model: skipped.", mode, 100 * requested)
                        continue
                    for variant in VARIANTS[mode]:
                        name, _, recover = variant
                        if (args.methods and name not in args.methods) or (recover and not args.recovery_steps):
                            continue
                        key = f"{split}|{mode}|{ratio:.4f}|{name}"
                        row = store.get(key)
                        if row is None or not Path(row["folder"]).is_dir():
                            row = {"key": key, **run_row(bench, split, mode, ratio, variant)}
                            store.add(row)
                        shapes.setdefault(f"{mode} {ratio:.3f}", row["folder"])
        if args.zero_shot:
            zero_shot_rows(bench, store, args.splits[0])
        rows = list(store.rows.values())
        speed = {}
        if args.speed_runs:
            first = args.splits[0]
            folders = {"dense": store.get(f"{first}|dense")["folder"]}
            if not args.no_unstructured:
                folders["unstructured 50 %"] = store.get(f"{first}|unstructured-50")["folder"]
            folders.update(shapes)
            speed = speed_table(folders, args)
        text = write_report(format_report(rows, speed, args), args.output)
        print(text)
        if args.results_doc:
            body = text.split("\n", 1)[1].strip()
            command = recorded_command("structured.py", argv)
            write_section("structured", f"{body}\n\nRegenerate: `{command} --results-doc`\n")
    finally:
        if temporary is not None:
            temporary.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
