"""Resumable runs: after each block, the pruned weights and the propagated activations go to `checkpoint_dir`.

Layout of the directory:
- `block_XXXX.safetensors`: the pruned weights of block XXXX's targets (one file per finished block);
- `state.pt`: the run fingerprint, the last finished block, the report records so far and the hidden states
  that feed the next block (overwritten atomically after each block; only the latest is kept);
A run restarted with the same model, calibration data and config finds the state, loads the finished blocks'
weights into the model and continues at the next block. A different fingerprint is refused, never overwritten.

The fingerprint covers the value of every parameter and buffer and the model's config (a different fine-tune of
the same architecture, even one that only changed biases or norms, or a changed `rope_theta`, is another run).
The state is read with `weights_only=True` (a file in `checkpoint_dir` can never run code) and records the SHA-256
of every block file; an unreadable state or a block file that does not match its digest (truncated, corrupted,
replaced) is refused before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..report import AttentionRecord, ExpertRecord, LayerRecord, PruneReport, ReconstructionRecord

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"


#: config.json keys that say how a model was loaded or run, not what it computes
TRANSIENT_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                         "_commit_hash")


def _stable_config(value: Any) -> Any:
    """A model config dict without its transient keys (`_attn_implementation*` too), in nested configs as well."""
    if isinstance(value, dict):
        return {k: _stable_config(v) for k, v in value.items()
                if k not in TRANSIENT_CONFIG_KEYS and not str(k).startswith("_attn_implementation")}
    if isinstance(value, (list, tuple)):
        return [_stable_config(v) for v in value]
    return value


def _offload_storage(model: torch.nn.Module) -> dict[str, Any]:
    """Module name -> accelerate `AlignDevicesHook` that keeps that module's weights off the device (meta tensors)."""
    from .offload import _align_hooks

    return {name: hook for name, module in model.named_modules() for hook in _align_hooks(module)
            if hook.offload and hook.weights_map is not None}


def _value(name: str, tensor: torch.Tensor, storage: dict[str, Any]) -> torch.Tensor:
    """The value of a parameter or buffer: read from the offload storage when the module holds a meta tensor."""
    if tensor.device.type != "meta":
        return tensor
    module = name
    while module:
        module = module.rpartition(".")[0]
        if module in storage:
            return storage[module].weights_map[name[len(module) + 1:]]
    if "" in storage:
        return storage[""].weights_map[name]
    raise ValueError(f"`{name}` is on the meta device and no offload storage holds it: the model cannot be "
                     "fingerprinted for a resumable run. Load it fully, or run without `checkpoint_dir`.")


def run_fingerprint(
    config_dict: dict[str, Any],
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    weights: Iterable[tuple[str, torch.Tensor]] = (),
) -> str:
    """Hash of what determines the result: the pruning config (minus run-placement fields), the model class, its
    config (minus transient keys such as `_name_or_path` or `dtype`), the value of every parameter and buffer, the
    extra `(name, tensor)` pairs of `weights`, and the calibration data.

    Tensors are hashed one at a time (offloaded ones read from accelerate's offload storage), so no copy of the
    model is made.
    """
    relevant = {k: v for k, v in config_dict.items() if k not in ("checkpoint_dir", "device")}
    h = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode())
    h.update(type(model).__name__.encode())
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "to_dict"):
        h.update(json.dumps(_stable_config(model_config.to_dict()), sort_keys=True, default=str).encode())
    storage = _offload_storage(model)
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            value = _value(name, tensor, storage)
            h.update(f"{kind}:{name}:{tuple(value.shape)}:{value.dtype}".encode())
            h.update(_tensor_bytes(value))
    for name, w in weights:
        h.update(name.encode())
        h.update(_tensor_bytes(w))
    for batch in batches:
        for key in sorted(batch):
            h.update(key.encode())
            h.update(_tensor_bytes(batch[key]))
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor of any dtype (bf16 has no numpy equivalent, so go through uint8)."""
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class BlockCheckpoint:
    """Saves and restores the per-block progress of one pruning run."""

    def __init__(self, directory: os.PathLike | str, fingerprint: str, rank: int = 0, world_size: int = 1) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        # each data-parallel rank keeps its own share of the activations; weights are written by rank 0
        self.state_file = STATE_FILE if world_size == 1 else f"state_rank{rank}.pt"
        self.writes_weights = rank == 0
        self._digests: dict[int, str] = {}  # SHA-256 of the block files this run wrote or verified

    def load(self) -> Optional[dict[str, Any]]:
        """The saved state of this run, None if there is none; raises if the directory belongs to another run."""
        path = self.directory / self.state_file
        if not path.is_file():
            if self.directory.exists() and any(p.suffix != ".tmp" for p in self.directory.iterdir()):
                raise CheckpointError(f"`checkpoint_dir` {self.directory} is not empty and holds no D²Prune state: "
                                 "choose an empty or new directory.")
            return None
        try:  # tensors and primitives only: a crafted file cannot run code
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated zip, bad pickle, forbidden global: all mean "not a usable state"
            raise CheckpointError(
                f"`checkpoint_dir` state {path} is unreadable or not a D²Prune state ({type(err).__name__}: "
                f"{str(err)[:200]}); it was not loaded. Delete {self.directory} (or choose a new directory) to "
                "start the run over."
            ) from err
        if not _digest_matches(state):
            raise CheckpointError(
                f"`checkpoint_dir` state {path} is corrupted (its content does not match the digest written with "
                f"it, or it has none); it was not used. Delete {self.directory} (or choose a new directory) to "
                "start the run over."
            )
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"`checkpoint_dir` {self.directory} holds a run with another model, calibration data or config; "
                "use a new directory (it is left untouched)."
            )
        self._verify_blocks(state)
        self._digests = dict(state["block_digests"])
        return state

    def _verify_blocks(self, state: dict[str, Any]) -> None:
        """Check every finished block's file against the digest in the state, before any weight is loaded."""
        digests = state.get("block_digests")
        if not isinstance(digests, dict):
            raise CheckpointError(f"`checkpoint_dir` {self.directory} holds a state without block digests (written "
                                  "by an older version); delete it to start the run over.")
        for block in range(state["last_block"] + 1):
            path = self.directory / _block_file(block)
            expected = digests.get(block)
            if expected is None:  # written by another rank in a distributed run
                continue
            actual = file_digest(path) if path.is_file() else "missing"
            if actual != expected:
                raise CheckpointError(
                    f"`checkpoint_dir` file {path} is {'missing' if actual == 'missing' else 'corrupted or truncated'}"
                    f" (its SHA-256 does not match the one recorded after block {block}); nothing was loaded. Delete "
                    f"{self.directory} (or choose a new directory) to start the run over."
                )

    def restore_weights(self, block: int, targets: list) -> None:
        weights = load_file(str(self.directory / _block_file(block)))
        for t in targets:
            t.write(weights[t.name])

    def save(
        self,
        block: int,
        targets: list,
        hidden_states: list[torch.Tensor],
        report: PruneReport,
        reference_states: Optional[list[torch.Tensor]] = None,
    ) -> None:
        """Write block `block`'s pruned weights, then atomically replace the state with the new activations (and
        the dense model's, `reference_states`, when the run propagates them)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.writes_weights:
            weights = {t.name: t.weight().detach().to("cpu").contiguous() for t in targets}
            tmp = self.directory / f".block_{block:04d}.tmp"
            save_file(weights, str(tmp))
            self._digests[block] = file_digest(tmp)
            os.replace(tmp, self.directory / _block_file(block))
        state = {
            "fingerprint": self.fingerprint,
            "last_block": block,
            "block_digests": {b: d for b, d in self._digests.items() if b <= block},
            "hidden_states": [h.detach().to("cpu") for h in hidden_states],
            "reference_states": [h.detach().to("cpu") for h in reference_states or []],
            "layers": [asdict(r) for r in report.layers],
            "attention": [asdict(a) for a in report.attention],
            "skipped": dict(report.skipped),
            "experts": [asdict(e) for e in report.experts],
            "block_sparsity": list(report.block_sparsity),
            "reconstruction": [asdict(r) for r in report.reconstruction],
        }
        state["digest"] = _state_digest(state)
        tmp = self.directory / f".{self.state_file}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.directory / self.state_file)


def _digest_matches(state: Any) -> bool:
    """Whether a loaded state is a dict holding the digest of its own content."""
    if not isinstance(state, dict) or not isinstance(state.get("digest"), str):
        return False
    try:
        return state["digest"] == _state_digest(state)
    except (AttributeError, TypeError, ValueError, RuntimeError):  # e.g. a non-tensor where tensors belong
        return False


def _state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of everything in a state except the digest itself (a flipped byte inside a tensor loads fine)."""
    h = hashlib.sha256()
    rest = {k: v for k, v in state.items() if k not in ("digest", "hidden_states", "reference_states")}
    h.update(json.dumps(rest, sort_keys=True, default=str).encode())
    for t in [*state.get("hidden_states", []), *state.get("reference_states", [])]:
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _block_file(block: int) -> str:
    return f"block_{block:04d}.safetensors"


def restore_report(state: dict[str, Any], report: PruneReport) -> None:
    """Put the records of the finished blocks back into `report`."""
    report.layers = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in state["layers"]]
    report.attention = [AttentionRecord(**a) for a in state["attention"]]
    report.skipped = dict(state.get("skipped", {}))
    report.experts = [ExpertRecord(**e) for e in state.get("experts", [])]
    report.block_sparsity = list(state.get("block_sparsity", []))
    report.reconstruction = [ReconstructionRecord(**r) for r in state.get("reconstruction", [])]
