"""The solver registry: methods are registry entries, a new one is one file's `@register_method`."""

from __future__ import annotations

import pytest

from conftest import calib_batches, make_tiny
from optimum_d2prune import D2PruneConfig, D2Pruner
from optimum_d2prune.configuration import METHODS
from optimum_d2prune.solvers import METHOD_REGISTRY, MagnitudeSolver, OBSSolver, WandaSolver, solvers_for
from optimum_d2prune.solvers.registry import register_method


def test_built_in_methods_are_registered():
    assert METHODS == ("d2prune", "sparsegpt", "wanda", "magnitude")
    update, non_update = solvers_for(D2PruneConfig(), 16)
    assert isinstance(update, OBSSolver) and isinstance(non_update, WandaSolver)
    assert update.name != "sparsegpt" and non_update.name == "d2-wanda"
    assert all(type(s) is WandaSolver for s in solvers_for(D2PruneConfig(method="wanda"), 16))
    assert all(type(s) is MagnitudeSolver for s in solvers_for(D2PruneConfig(method="magnitude"), 16))


def test_a_registered_method_is_accepted_and_used():
    class HalfMagnitude(MagnitudeSolver):
        name = "test-magnitude"

    @register_method("test-magnitude")
    def _factory(config, seq_len):
        return HalfMagnitude(), HalfMagnitude()

    try:
        model = make_tiny("llama")
        pruner = D2Pruner(D2PruneConfig(sparsity=0.5, method="test-magnitude"))
        pruner.prune(model, calib_batches())
        assert {r.solver for r in pruner.report.layers} == {"test-magnitude"}
        with pytest.raises(ValueError, match="registered twice"):
            register_method("test-magnitude")(_factory)
    finally:
        METHOD_REGISTRY.pop("test-magnitude")
    with pytest.raises(ValueError, match="`method` must be one of"):
        D2PruneConfig(method="test-magnitude")
