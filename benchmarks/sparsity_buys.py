"""What sparsity buys on a CPU, measured: checkpoint size and forward speed of SmolLM2-135M dense, 50 % unstructured
and 2:4, in plain transformers (no sparse kernel exists there), float32 and bfloat16.

    python benchmarks/sparsity_buys.py --threads 2          # writes results/sparsity_buys.md and its docs section

Sizes: the safetensors file `save_pretrained` writes, and the same file compressed with gzip (what a sparse
storage format could at best recover). Speed: prefill tokens/s on one 512-token sequence, and decode tokens/s at
batch 1 and 8 (64 new tokens after a 64-token prompt, greedy), the models measured in turn, alternating, median of
`--repeats` runs each, all in one process.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import RESULTS, ProtocolSettings, set_threads, write_report, write_section  # noqa: E402

from optimum_d2prune import D2PruneConfig, D2Pruner  # noqa: E402
from optimum_d2prune.calibration import get_calibration_dataset  # noqa: E402
from optimum_d2prune.models import load_causal_lm  # noqa: E402

logger = logging.getLogger("sparsity_buys")

LEVELS = {"dense": None, "50 % unstructured": {"sparsity": 0.5}, "2:4": {"mask_structure": "2:4"}}


def checkpoint_sizes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the safetensors files, bytes once gzip-compressed)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = sorted(Path(tmp).glob("*.safetensors"))
        raw = sum(f.stat().st_size for f in files)
        packed = sum(len(gzip.compress(f.read_bytes(), compresslevel=6)) for f in files)
    return raw, packed


def timed(fn: Callable[[], None]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


@torch.no_grad()
def speed_runs(model: torch.nn.Module, vocab: int) -> dict[str, Callable[[], float]]:
    """tokens/s of each workload, one run per call."""
    g = torch.Generator().manual_seed(0)
    prefill = torch.randint(0, vocab, (1, 512), generator=g)
    prompts = {b: torch.randint(0, vocab, (b, 64), generator=g) for b in (1, 8)}

    def decode(batch: int) -> float:
        ids = prompts[batch]
        seconds = timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                                               min_new_tokens=64, do_sample=False, pad_token_id=0))
        return batch * 64 / seconds

    return {"prefill 512 tok/s": lambda: 512 / timed(lambda: model(prefill)),
            "decode b1 tok/s": lambda: decode(1), "decode b8 tok/s": lambda: decode(8)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS / "sparsity_buys.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    settings = ProtocolSettings()
    base, tokenizer = load_causal_lm(settings.model)
    dense = {k: v.clone() for k, v in base.state_dict().items()}
    calib = get_calibration_dataset(settings.c4, tokenizer, settings.num_samples, settings.seq_len, seed=0)
    states = {}
    for name, level in LEVELS.items():
        base.load_state_dict(dense)
        if level is not None:
            D2Pruner(D2PruneConfig(**level)).prune(base, calib)
        states[name] = {k: v.clone() for k, v in base.state_dict().items()}
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        models = {}
        for name, state in states.items():
            model, _ = load_causal_lm(settings.model, dtype=torch.float32)
            model.load_state_dict(state)
            models[name] = model.to(dtype).eval()
        sizes = {name: checkpoint_sizes(m) for name, m in models.items()}
        runs = {name: speed_runs(m, len(tokenizer)) for name, m in models.items()}
        results: dict[str, dict[str, list[float]]] = {n: {w: [] for w in runs[n]} for n in runs}
        for name in runs:  # warm-up
            for run in runs[name].values():
                run()
        for repeat in range(args.repeats):
            order = list(runs) if repeat % 2 == 0 else list(reversed(runs))  # alternating order
            for name in order:
                for workload, run in runs[name].items():
                    results[name][workload].append(run())
        for name in models:
            medians = {w: statistics.median(v) for w, v in results[name].items()}
            rows.append((str(dtype).replace("torch.", ""), name, sizes[name], medians))
            logger.info("%s %s: %s", dtype, name, medians)
    workloads = list(rows[0][3])
    lines = ["| dtype | model | safetensors MB | gzip MB | " + " | ".join(workloads) + " |",
             "|---|---|---:|---:|" + "---:|" * len(workloads)]
    for dtype, name, (raw, packed), medians in rows:
        lines.append(f"| {dtype} | {name} | {raw / 1e6:.1f} | {packed / 1e6:.1f} | "
                     + " | ".join(f"{medians[w]:.1f}" for w in workloads) + " |")
    text = "\n".join([
        f"SmolLM2-135M-Instruct, CPU, torch threads: {args.threads}, plain transformers; median of {args.repeats} "
        "runs, models alternating. Pruned with D²Prune on the benchmark calibration (32 x 512 C4 tokens).", "",
        *lines, ""])
    print(text)
    write_report(text, args.output)
    write_section("sparsity_buys", text + "\nCommand: `python benchmarks/sparsity_buys.py --threads "
                  f"{args.threads}`\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
