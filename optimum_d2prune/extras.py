"""Imports on demand: optional dependencies through `require`, whose error names the extra to install
(`pip install "optimum-d2prune[report]"`), and the lazy public names of a package (`lazy_names`)."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any, Callable

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


def lazy_names(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for a package whose public `names` (name -> submodule) are imported on first use, so
    that importing the package stays cheap (the command line imports parts of this library at every start)."""
    module = importlib.import_module(package)

    def getattr_(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
            setattr(module, name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted(set(vars(module)) | set(names))

    return getattr_, dir_
