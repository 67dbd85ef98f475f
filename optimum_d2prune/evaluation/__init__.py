"""Evaluation: perplexity for language models, top-1/top-5 accuracy for image classifiers."""

from .image import ImageAccuracy, image_accuracy
from .perplexity import perplexity

__all__ = ["ImageAccuracy", "image_accuracy", "perplexity"]
