"""Evaluation: perplexity, top-1/top-5 image accuracy, and zero-shot accuracy through lm-eval."""

from .image import ImageAccuracy, image_accuracy
from .perplexity import Perplexity, perplexity, perplexity_of_batches
from .zeroshot import PAPER_TASKS, ZeroShotResults, zero_shot

__all__ = ["PAPER_TASKS", "ImageAccuracy", "Perplexity", "ZeroShotResults", "image_accuracy", "perplexity",
           "perplexity_of_batches", "zero_shot"]
