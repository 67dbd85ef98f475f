"""The benchmark protocol (benchmarks/protocol.py): the row store, the run cache shared by config, the hand-written
notes of results files, and the seeds of the high-sparsity sweep. No model is pruned."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1]


@pytest.fixture
def protocol_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import protocol

    yield protocol
    sys.modules.pop("protocol", None)


def test_row_store_resumes_and_refuses_other_settings(tmp_path, protocol_module):
    settings = protocol_module.ProtocolSettings(num_samples=2, eval_windows=2)
    path = tmp_path / "rows.json"
    store = protocol_module.RowStore(path, settings)
    row = {"name": "default", "level": "0.5", "seed": 0, "split": "dev",
           "overrides": {"method_options": {"kl_weight": 3.0}}, "ppl": 1.5}
    store.add(row)
    again = protocol_module.RowStore(path, settings)
    assert again.get("default", "0.5", 0, "dev") == row
    assert again.get("default", "0.5", 1, "dev") is None
    with pytest.raises(ValueError, match="rows of another protocol"):
        protocol_module.RowStore(path, protocol_module.ProtocolSettings(num_samples=32))


def test_run_cache_is_shared_by_config_not_by_name(tmp_path, protocol_module):
    """A run finished by one script (under its name) is reused by another script's row of the same resolved config,
    without loading the model; a config that differs in any resolved field is not; concurrent writers merge."""
    from optimum_d2prune import D2PruneConfig

    settings = protocol_module.ProtocolSettings(num_samples=2, eval_windows=2)
    path = tmp_path / "runs.json"
    config = protocol_module.canonical(D2PruneConfig(method="sparsegpt", sparsity=0.5), 1)
    writer, other = protocol_module.RunCache(path, settings), protocol_module.RunCache(path, settings)
    writer.add(config, "dev", {"ppl": 60.0, "ratio": 1.8, "seconds": 9.0, "name": "ignored"})
    other.add(protocol_module.canonical(D2PruneConfig(sparsity=0.5), 0), "dev", {"ppl": 55.0})  # read before
    cache = protocol_module.RunCache(path, settings)
    assert len(cache.runs) == 2 and "name" not in cache.get(config, "dev")
    bench = protocol_module.Protocol(settings, protocol_module.RowStore(None, settings), cache)
    bench.store.add({"name": "dense", "level": "-", "seed": 0, "split": "dev", "overrides": {}, "ppl": 33.0})
    row = bench.run("sparsegpt", {"method": "sparsegpt"}, "0.5", 1, "dev")
    assert (row["name"], row["ppl"], row["seconds"]) == ("sparsegpt", 60.0, 9.0) and bench._model is None
    assert bench.store.get("sparsegpt", "0.5", 1, "dev") == row
    # a table-only pass: finished runs come from the cache, the others are None, nothing is pruned or scored
    table = protocol_module.Protocol(settings, protocol_module.RowStore(None, settings), cache)
    assert table.finished("sgpt", {"method": "sparsegpt"}, "0.5", 1, "dev")["ppl"] == 60.0
    assert table.finished("sgpt", {"method": "sparsegpt"}, "0.5", 2, "dev") is None
    assert table._model is None and table.store.get("dense", "-", 0, "dev") is None
    assert cache.get(protocol_module.canonical(D2PruneConfig(method="sparsegpt", sparsity=0.5), 2), "dev") is None
    assert cache.get(config, "bench") is None
    assert cache.get(config, "dev", threads=torch.get_num_threads() + 1) is None  # another summation order
    # a method-dependent default left to the library is the same run as the value named
    named = protocol_module.canonical(D2PruneConfig(sparsity=0.5, method_options={"refit_steps": 8}), 0)
    assert cache.get(named, "dev")["ppl"] == 55.0
    fewer = protocol_module.canonical(D2PruneConfig(sparsity=0.5, method_options={"refit_steps": 4}), 0)
    assert cache.get(fewer, "dev") is None
    with pytest.raises(ValueError, match="runs of another protocol"):
        protocol_module.RunCache(path, protocol_module.ProtocolSettings())


def test_a_run_cached_before_a_field_existed_keeps_the_value_it_ran_with(tmp_path, protocol_module):
    """A max_quality run cached (in the flat format of an earlier release) before `admm_steps` existed ran without
    ADMM: it is the `admm_steps=0` run, not the run of today's preset (which sets 12), in the cache and in a rows file
    alike."""
    settings = protocol_module.ProtocolSettings(num_samples=2, eval_windows=2)
    old = {"sparsity": 0.7, "mask_structure": "unstructured", "method": "d2prune", "preset": "max_quality",
           "refine_steps": None, "refine_tolerance": 0.0, "attention_update": "dynamic",
           "sparsity_allocation": "uniform", "block_reconstruction": True, "reconstruction_targets": "outputs",
           "reconstruction_reference": "block", "seed": 0}
    cache = protocol_module.RunCache(tmp_path / "runs.json", settings)
    cache.add(old, "dev", {"ppl": 150.0})
    table = protocol_module.Protocol(settings, protocol_module.RowStore(None, settings), cache)
    preset = {"preset": "max_quality"}
    assert table.finished("mq", preset, "0.7", 0, "dev") is None
    assert table.finished("mq-admm", {**preset, "method_options": {"admm_steps": 0}}, "0.7", 0, "dev")["ppl"] == 150.0
    rows = protocol_module.Protocol(settings, protocol_module.RowStore(None, settings))
    rows.store.add({"name": "mq", "level": "0.7", "seed": 0, "split": "dev", "overrides": preset, "ppl": 150.0,
                    "config": old})
    with pytest.raises(ValueError, match="was run with another config"):
        rows.finished("mq", preset, "0.7", 0, "dev")


def test_a_run_cached_before_a_library_revision_is_not_taken_for_todays(tmp_path, protocol_module):
    """A max_quality run cached before the block-refit projections' ADMM moved to the block objective (revision 1)
    is not today's run, in the cache or a rows file; a config the revision does not touch still hits, and a run
    stored today is found again."""
    from optimum_d2prune import D2PruneConfig

    settings = protocol_module.ProtocolSettings(num_samples=2, eval_windows=2)
    preset = {"preset": "max_quality"}
    config = protocol_module.canonical(D2PruneConfig(sparsity=0.7, **preset), 0)
    untouched = protocol_module.canonical(D2PruneConfig(sparsity=0.7, method_options={"admm_steps": 0}, **preset), 0)
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"protocol": dataclasses.asdict(settings), "runs": [
        {"config": c, "split": "dev", "threads": torch.get_num_threads(), "ppl": p}
        for c, p in ((config, 150.0), (untouched, 160.0))]}))
    cache = protocol_module.RunCache(path, settings)
    table = protocol_module.Protocol(settings, protocol_module.RowStore(None, settings), cache)
    assert table.finished("mq", preset, "0.7", 0, "dev") is None
    assert table.finished("mq-admm", {**preset, "method_options": {"admm_steps": 0}}, "0.7", 0, "dev")["ppl"] == 160.0
    cache.add(config, "dev", {"ppl": 140.0})
    assert json.loads(path.read_text())["runs"][-1]["revision"] == 1
    again = protocol_module.Protocol(settings, protocol_module.RowStore(None, settings),
                                     protocol_module.RunCache(path, settings))
    assert again.finished("mq", preset, "0.7", 0, "dev")["ppl"] == 140.0
    rows = protocol_module.Protocol(settings, protocol_module.RowStore(None, settings))
    rows.store.add({"name": "mq", "level": "0.7", "seed": 0, "split": "dev", "overrides": preset, "ppl": 150.0,
                    "config": config})
    with pytest.raises(ValueError, match="library changed what this config does"):
        rows.finished("mq", preset, "0.7", 0, "dev")


def test_protocol_rejects_an_unknown_split(protocol_module):
    bench = protocol_module.Protocol(protocol_module.ProtocolSettings())
    with pytest.raises(ValueError, match="`split` must be one of"):
        bench.calibration("test", 0)


def test_a_regenerated_table_keeps_the_hand_written_notes(tmp_path, protocol_module):
    """Rewriting a results file replaces the table above the marker and keeps what was written below it; a file
    without the marker is the script's alone."""
    path = tmp_path / "table.md"
    notes = protocol_module.HAND_NOTES + "\n## Notes\n\n- measured by hand\n"
    path.write_text("| old table |\n\n" + notes)
    assert protocol_module.write_report("| new table |\n", str(path)) == "| new table |\n"
    assert path.read_text() == "| new table |\n\n" + notes
    protocol_module.write_report("| newer table |\n", str(path))
    assert path.read_text() == "| newer table |\n\n" + notes
    bare = tmp_path / "bare.md"
    bare.write_text("| old table |\n\n## Notes without the marker\n")
    protocol_module.write_report("| new table |\n", str(bare))
    assert bare.read_text() == "| new table |\n"


def test_high_sparsity_seeds_skip_the_ablation_rows_at_their_single_seed_levels(monkeypatch):
    """At a seeded level every config runs at each seed but those of `FIRST_SEED_AT`, which run at the first."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import high_sparsity

    try:
        configs = {name: high_sparsity.CONFIGS[name] for name in ("max_quality", "max_quality+owl-admm")}
        plan = list(high_sparsity.runs(configs, list(configs), ["0.5", "0.6", "0.7"], [0, 1, 2], ["0.5", "0.7"],
                                       ["dev"]))
        seeds = {(name, level): sorted(s for n, lv, s, _ in plan if (n, lv) == (name, level))
                 for name, level, _, _ in plan}
        assert seeds == {("max_quality", "0.5"): [0, 1, 2], ("max_quality", "0.6"): [0],
                         ("max_quality", "0.7"): [0, 1, 2], ("max_quality+owl-admm", "0.5"): [0],
                         ("max_quality+owl-admm", "0.6"): [0], ("max_quality+owl-admm", "0.7"): [0, 1, 2]}
    finally:
        sys.modules.pop("high_sparsity", None)
        sys.modules.pop("protocol", None)
