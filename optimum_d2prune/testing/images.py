"""A tiny image folder (one subfolder of random PNG images per class), for tests and documentation examples."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np


def image_folder(root: Union[str, os.PathLike], classes: int = 2, per_class: int = 4, size: int = 32,
                 seed: int = 0) -> Path:
    """Write `classes` subfolders of `per_class` random RGB PNGs of `size` pixels under `root`; returns `root`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{number}.png")
    return root
