"""optimum-d2prune: D²Prune (dual-Taylor saliency + attention-aware updates) for transformers models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .extras import lazy_names

__version__ = "0.1.0"

# public name -> submodule; imported on first use so that `optimum-cli` (which imports the command registration
# at every start) and `python -m optimum_d2prune --help` do not pay for torch/transformers
_LAZY = {
    "D2PruneConfig": "configuration",
    "RuntimeOptions": "configuration",
    "D2Pruner": "pruner",
    "PruneReport": "report",
    "load_pruned": "io.save_load",
    "push_to_hub": "io.hub",
    "save_pruned": "io.save_load",
    "to_semi_structured": "semi_structured",
}

__all__ = [
    "D2PruneConfig",
    "D2Pruner",
    "PruneReport",
    "RuntimeOptions",
    "__version__",
    "load_pruned",
    "push_to_hub",
    "save_pruned",
    "to_semi_structured",
]

if TYPE_CHECKING:
    from .configuration import D2PruneConfig, RuntimeOptions
    from .io.hub import push_to_hub
    from .io.save_load import load_pruned, save_pruned
    from .pruner import D2Pruner
    from .report import PruneReport
    from .semi_structured import to_semi_structured


__getattr__, __dir__ = lazy_names(__name__, _LAZY)

