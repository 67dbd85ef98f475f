"""The method registry: a name -> a `PruningMethod` class.

Adding a method is one file that defines it and registers it; no library file changes:

```python
from optimum_d2prune.methods import register_method
from optimum_d2prune.methods.base import PruningMethod

@register_method
class MyMethod(PruningMethod):
    name = "my-method"
    def setup(self, seq_len):
        self.solver = MySolver(...)
```
`D2PruneConfig(method="my-method")` then accepts it, with `method_options` of its `options_class`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import PruningMethod

#: method name -> class, in registration order (the built-ins first, once `registered_methods` has run)
METHOD_REGISTRY: dict[str, type["PruningMethod"]] = {}

_BUILTIN_MODULES = ("d2prune.method", "sparsegpt", "wanda", "magnitude", "shrink")


def register_method(cls: type["PruningMethod"]) -> type["PruningMethod"]:
    """Class decorator: register a `PruningMethod` subclass under its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cls.__name__} needs a class attribute `name` to be registered.")
    if METHOD_REGISTRY.get(name, cls) is not cls:
        raise ConfigError(f"Pruning method {name!r} is registered twice.")
    METHOD_REGISTRY[name] = cls
    return cls


def registered_methods() -> dict[str, type["PruningMethod"]]:
    """Every registered method, the built-in ones included (imported on first use: they need torch)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return METHOD_REGISTRY


def get_method(name: str) -> type["PruningMethod"]:
    methods = registered_methods()
    if name not in methods:
        raise ConfigError(f"`method` must be one of {tuple(methods)}, got {name!r}.")
    return methods[name]
