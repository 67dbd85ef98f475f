"""optimum-d2prune: D²Prune (dual-Taylor saliency + attention-aware updates) for transformers models."""

from .configuration import D2PruneConfig
from .pruner import D2Pruner
from .report import PruneReport
from .semi_structured import to_semi_structured

__version__ = "0.1.0"

__all__ = ["D2PruneConfig", "D2Pruner", "PruneReport", "__version__", "to_semi_structured"]
