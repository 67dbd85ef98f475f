"""GPU timing: pruning a `deit_base_patch16_224`-shaped timm ViT (random weights) on ImageNet-shaped inputs.

Times method x level on 128 calibration images of 3x224x224 (random normal, the shape and scale of normalised
ImageNet images; quality is not measured: random weights). Meant for a GPU machine; it runs on CPU too with a
tiny option, e.g. a smoke check:

    python benchmarks/vision_gpu.py                                    # GPU: deit_base, 128 images, all methods
    python benchmarks/vision_gpu.py --images 2 --depth 1 --levels 0.5  # CPU smoke check (about a minute)
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

from optimum_d2prune import D2Pruner
from optimum_d2prune.memory.measure import PeakMemory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import make_config  # noqa: E402

#: config overrides of each method name (d2prune-layer: the per-block q/k/v choice instead of the global search)
METHODS = {"magnitude": {"method": "magnitude"}, "wanda": {"method": "wanda"}, "sparsegpt": {"method": "sparsegpt"},
           "d2prune": {"method": "d2prune"},
           "d2prune-layer": {"method": "d2prune", "method_options": {"strategy": "layer"}}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_base_patch16_224", help="timm model name (random weights).")
    parser.add_argument("--depth", type=int, default=None, help="Override the number of blocks (smoke checks).")
    parser.add_argument("--images", type=int, default=128, help="Calibration images.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="Methods; d2prune-layer is D²Prune with the per-block q/k/v choice instead of the "
                             "global search that is the default for vision models.")
    parser.add_argument("--levels", nargs="+", default=["0.5", "0.8", "2:4"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import timm

    kwargs = {"depth": args.depth} if args.depth else {}
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, **kwargs)
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, *size, generator=g).to(getattr(torch, args.dtype))
    calib = [images[i:i + args.batch_size] for i in range(0, args.images, args.batch_size)]
    dense_state = copy.deepcopy(model.state_dict())
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    for level in args.levels:
        for method in args.methods:
            model.load_state_dict(dense_state)
            pruner = D2Pruner(make_config(METHODS[method], level))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with PeakMemory(device) as memory:
                pruner.prune(model, calib)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row = {"method": method, "level": level, "seconds": time.perf_counter() - start,
                   "peak_mib": memory.peak_bytes / 2**20, "sparsity": pruner.report.total_sparsity}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    blocks = len(model.blocks)
    print(f"\n{args.model} ({blocks} blocks, random weights, {args.dtype}) on {name}; {args.images} calibration "
          f"images of {'x'.join(map(str, size))}, batches of {args.batch_size}.\n")
    print("| level | method | prune s | peak MiB | sparsity |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['level']} | {r['method']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['sparsity']:.2%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
