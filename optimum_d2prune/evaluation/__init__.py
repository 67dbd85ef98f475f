"""Evaluation: perplexity, and zero-shot accuracy through lm-eval."""

from .perplexity import perplexity
from .zeroshot import PAPER_TASKS, ZeroShotResults, zero_shot

__all__ = ["PAPER_TASKS", "ZeroShotResults", "perplexity", "zero_shot"]
