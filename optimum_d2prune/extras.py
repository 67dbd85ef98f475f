"""Optional dependencies: each feature that needs one imports it through `require`, whose error names the extra to
install (`pip install "optimum-d2prune[report]"`)."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: module -> (extra of setup.cfg, what needs it)
EXTRAS = {
    "gguf": ("gguf", "loading .gguf models and reading their metadata"),
    "matplotlib": ("report", "the figures of report.html"),
    "datasets": ("data", 'Hub datasets ("c4", "wikitext2", image datasets)'),
    "timm": ("vision", "timm models and their image preprocessing"),
    "sklearn": ("vision", "the digits vision fixtures"),
    "lm_eval": ("zeroshot", "zero-shot evaluation"),
}


def is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str) -> ModuleType:
    """Import an optional dependency, or raise an `ImportError` that says which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra, purpose = EXTRAS[module.split(".")[0]]
        raise ImportError(f"{purpose.capitalize()} needs `{module.split('.')[0]}`: "
                          f'pip install "optimum-d2prune[{extra}]".') from None
