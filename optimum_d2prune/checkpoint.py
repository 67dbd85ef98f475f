"""Resumable runs: after each block, the pruned weights and the propagated activations go to `checkpoint_dir`.

Layout of the directory:
- `block_XXXX.safetensors`: the pruned weights of block XXXX's targets (one file per finished block);
- `state.pt`: the run fingerprint, the last finished block, the report records so far and the hidden states
  that feed the next block (overwritten atomically after each block; only the latest is kept);
A run restarted with the same model, calibration data and config finds the state, loads the finished blocks'
weights into the model and continues at the next block. A different fingerprint is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .report import AttentionRecord, LayerRecord, PruneReport

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def run_fingerprint(config_dict: dict[str, Any], model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> str:
    """Hash of what determines the result: the config (minus run-placement fields), the model's identity and
    the calibration data."""
    relevant = {k: v for k, v in config_dict.items() if k not in ("checkpoint_dir", "device")}
    h = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode())
    h.update(type(model).__name__.encode())
    h.update(str(getattr(getattr(model, "config", None), "_name_or_path", "")).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    for batch in batches:
        for key in sorted(batch):
            t = batch[key].contiguous()
            h.update(key.encode())
            h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()


class BlockCheckpoint:
    """Saves and restores the per-block progress of one pruning run."""

    def __init__(self, directory: os.PathLike | str, fingerprint: str, rank: int = 0, world_size: int = 1) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        # each data-parallel rank keeps its own share of the activations; weights are written by rank 0
        self.state_file = STATE_FILE if world_size == 1 else f"state_rank{rank}.pt"

    def load(self) -> Optional[dict[str, Any]]:
        """The saved state of this run, None if there is none; raises if the directory belongs to another run."""
        path = self.directory / self.state_file
        if not path.is_file():
            if self.directory.exists() and any(p.suffix != ".tmp" for p in self.directory.iterdir()):
                raise ValueError(f"`checkpoint_dir` {self.directory} is not empty and holds no D²Prune state: "
                                 "choose an empty or new directory.")
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"`checkpoint_dir` {self.directory} holds a run with another model, calibration data or config; "
                "use a new directory (it is left untouched)."
            )
        return state

    def restore_weights(self, block: int, targets: list) -> None:
        weights = load_file(str(self.directory / f"block_{block:04d}.safetensors"))
        for t in targets:
            t.write(weights[t.name])

    def save(
        self,
        block: int,
        targets: list,
        hidden_states: list[torch.Tensor],
        report: PruneReport,
        write_weights: bool = True,
    ) -> None:
        """Write block `block`'s pruned weights, then atomically replace the state with the new activations."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if write_weights:
            weights = {t.name: t.weight().detach().to("cpu").contiguous() for t in targets}
            tmp = self.directory / f".block_{block:04d}.tmp"
            save_file(weights, str(tmp))
            os.replace(tmp, self.directory / f"block_{block:04d}.safetensors")
        state = {
            "fingerprint": self.fingerprint,
            "last_block": block,
            "hidden_states": [h.detach().to("cpu") for h in hidden_states],
            "layers": [asdict(r) for r in report.layers],
            "attention": [asdict(a) for a in report.attention],
        }
        tmp = self.directory / f".{self.state_file}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.directory / self.state_file)


def restore_report(state: dict[str, Any], report: PruneReport) -> None:
    """Put the records of the finished blocks back into `report`."""
    report.layers = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in state["layers"]]
    report.attention = [AttentionRecord(**a) for a in state["attention"]]
