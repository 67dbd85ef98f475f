"""The method registry: a pruning method name -> the pair of solvers it uses.

A method is `(update_solver, non_update_solver)`: the solver for layers whose surviving weights may be updated, and
the one for the attention projection left without update (D²Prune's attention awareness; baselines use the same
solver for both). Adding a solver is one file in this package that defines it and registers its method:

```python
@register_method("my-method")
def _my_method(config, seq_len):
    solver = MySolver(...)
    return solver, solver
```
The package imports every module in it, and `D2PruneConfig(method=...)` accepts every registered name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..configuration import D2PruneConfig
    from .base import Solver

MethodFactory = Callable[["D2PruneConfig", int], "tuple[Solver, Solver]"]

#: method name -> factory `(config, seq_len) -> (update_solver, non_update_solver)`, in registration order
METHOD_REGISTRY: dict[str, MethodFactory] = {}


def register_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: register a factory of `(update_solver, non_update_solver)` under a method name."""

    def wrap(factory: MethodFactory) -> MethodFactory:
        if name in METHOD_REGISTRY:
            raise ValueError(f"Pruning method {name!r} is registered twice.")
        METHOD_REGISTRY[name] = factory
        return factory

    return wrap
