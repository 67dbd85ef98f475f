"""Command-line interface: `optimum-cli d2prune` and `python -m optimum_d2prune` (kept free of heavy imports)."""

from .d2prune import D2PruneCommand, add_d2prune_arguments, build_parser, main
from .run import run_d2prune

__all__ = ["D2PruneCommand", "add_d2prune_arguments", "build_parser", "main", "run_d2prune"]
