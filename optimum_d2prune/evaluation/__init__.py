"""Evaluation: perplexity (and, for other model kinds, their metrics)."""

from .perplexity import perplexity

__all__ = ["perplexity"]
