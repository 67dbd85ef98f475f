"""Bit-identity check of a refactor: prune SmolLM2 on the BENCH.md v1 calibration with a few configs and record a
digest of every weight of the pruned model, the calibration tokens and the per-block choices.

    python benchmarks/bitwise.py --threads 1 --output /tmp/before.json            # on the old revision
    python benchmarks/bitwise.py --threads 1 --output /tmp/after.json --compare /tmp/before.json

A refactor that changes no number leaves every digest equal at the same thread count. `--compare` prints, per
config, whether masks and weights are identical, how many tensors differ and the largest weight difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import ProtocolSettings, set_threads  # noqa: E402

from optimum_d2prune import D2PruneConfig, D2Pruner  # noqa: E402
from optimum_d2prune.calibration import get_calibration_dataset  # noqa: E402
from optimum_d2prune.evaluation import perplexity  # noqa: E402
from optimum_d2prune.models import load_causal_lm  # noqa: E402

logger = logging.getLogger("bitwise")

#: name -> D2PruneConfig keyword arguments (the configurations a refactor must leave bit-identical)
CONFIGS = {
    "d2prune-50": {"sparsity": 0.5},
    "d2prune-2:4": {"mask_structure": "2:4"},
    "sparsegpt-50": {"sparsity": 0.5, "method": "sparsegpt"},
    "max_quality-70": {"sparsity": 0.7, "preset": "max_quality"},
}


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def run(names: list[str], eval_windows: int) -> dict:
    settings = ProtocolSettings()
    model, tokenizer = load_causal_lm(settings.model)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = get_calibration_dataset(settings.c4, tokenizer, settings.num_samples, settings.seq_len, seed=0)
    out = {"threads": torch.get_num_threads(), "calibration": digest(torch.cat([b["input_ids"] for b in calib]))}
    for name in names:
        model.load_state_dict(dense)
        pruner = D2Pruner(D2PruneConfig(**CONFIGS[name]))
        tic = time.perf_counter()
        pruner.prune(model, calib)
        seconds = time.perf_counter() - tic
        state = model.state_dict()
        row = {
            "seconds": seconds,
            "weights": {k: digest(v) for k, v in state.items()},
            "masks": {k: digest(v == 0) for k, v in state.items() if v.dim() == 2},
            "attention": [[a.block, a.chosen] for a in pruner.report.attention],
            "tensors": {k: v.clone() for k, v in state.items() if v.dim() == 2},
        }
        if eval_windows:
            row["ppl"] = perplexity(model, tokenizer, settings.wikitext, seq_len=settings.seq_len,
                                    max_windows=eval_windows)
        logger.info("%s: %.1f s%s", name, seconds, f", PPL {row['ppl']:.4f}" if eval_windows else "")
        out[name] = row
    return out


def compare(after: dict, before: dict, tensors_before: dict) -> str:
    lines = [f"calibration tokens identical: {after['calibration'] == before['calibration']}", "",
             "| config | masks identical | weights identical | tensors differing | max abs weight diff | PPL before "
             "-> after | attention choices identical |", "|---|---|---|---|---|---|---|"]
    for name, row in after.items():
        if not isinstance(row, dict) or name not in before:
            continue
        old = before[name]
        differing = [k for k in row["weights"] if row["weights"][k] != old["weights"].get(k)]
        max_diff = max((float((row["tensors"][k].float() - tensors_before[name][k].float()).abs().max())
                        for k in differing if k in row["tensors"] and name in tensors_before), default=0.0)
        ppl = f"{old.get('ppl', float('nan')):.4f} -> {row.get('ppl', float('nan')):.4f}"
        lines.append(f"| {name} | {row['masks'] == old['masks']} | {not differing} | {len(differing)} | "
                     f"{max_diff:.3g} | {ppl} | {row['attention'] == old['attention']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-windows", type=int, default=32, help="WikiText-2 windows scored (0: none).")
    parser.add_argument("--output", required=True, help="JSON of the digests (the tensors go next to it, .pt).")
    parser.add_argument("--compare", default=None, help="The --output file of another run to compare with.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    result = run(args.configs, args.eval_windows)
    tensors = {name: row.pop("tensors") for name, row in result.items() if isinstance(row, dict) and "tensors" in row}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    torch.save(tensors, Path(args.output).with_suffix(".pt"))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        print(compare({**result, **{n: {**r, "tensors": tensors[n]} for n, r in result.items() if n in tensors}},
                      before, torch.load(Path(args.compare).with_suffix(".pt"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
