"""Saved checkpoints and everything that writes, reads or publishes them.

- `atomic`: which output folders a save may write or replace (`check_output_dir`), and the atomic folder swap;
- `gguf`: metadata of the GGUF file a model was dequantized from;
- `record`: `d2prune_config.json`, built from the weights and read back strictly;
- `save_load`: `save_pruned`, `record_evaluation`, `read_record`, `verify_sparsity`, `load_pruned`;
- `hub`: Hub ids, reachability, `check_push_access`, base-model discovery, `push_to_hub`;
- `modelcard`: the escaped model card.

Public names are imported on first use: the CLI imports `io.atomic` and `io.hub` at start, without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..extras import lazy_names

_LAZY = {
    "check_output_dir": "atomic",
    "atomic_directory": "atomic",
    "read_gguf_info": "gguf",
    "new_run_id": "record",
    "save_pruned": "save_load",
    "record_evaluation": "save_load",
    "read_record": "save_load",
    "verify_sparsity": "save_load",
    "load_pruned": "save_load",
    "check_push_access": "hub",
    "hub_offline_reason": "hub",
    "is_repo_id": "hub",
    "base_model_info": "hub",
    "checkpoint_files": "hub",
    "push_to_hub": "hub",
    "make_model_card": "modelcard",
}

__all__ = [
    "atomic_directory",
    "base_model_info",
    "check_output_dir",
    "check_push_access",
    "checkpoint_files",
    "hub_offline_reason",
    "is_repo_id",
    "load_pruned",
    "make_model_card",
    "new_run_id",
    "push_to_hub",
    "read_gguf_info",
    "read_record",
    "record_evaluation",
    "save_pruned",
    "verify_sparsity",
]

if TYPE_CHECKING:
    from .atomic import atomic_directory, check_output_dir
    from .gguf import read_gguf_info
    from .hub import base_model_info, check_push_access, checkpoint_files, hub_offline_reason, is_repo_id, push_to_hub
    from .modelcard import make_model_card
    from .record import new_run_id
    from .save_load import load_pruned, read_record, record_evaluation, save_pruned, verify_sparsity


__getattr__, __dir__ = lazy_names(__name__, _LAZY)

