"""Evaluation: perplexity, top-1/top-5 image accuracy, and zero-shot accuracy through lm-eval."""

from .image import ImageAccuracy, image_accuracy
from .perplexity import perplexity
from .zeroshot import PAPER_TASKS, ZeroShotResults, zero_shot

__all__ = ["PAPER_TASKS", "ImageAccuracy", "ZeroShotResults", "image_accuracy", "perplexity", "zero_shot"]
