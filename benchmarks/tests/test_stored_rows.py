"""The stored results stay readable by today's scripts: every run of the shared cache has its own key, and each
rows file's rows are found by the config its script names today (no model is loaded, nothing is pruned)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_every_stored_run_has_a_distinct_canonical_key(bench):
    protocol = bench("protocol")
    runs = json.loads((RESULTS / "runs.json").read_text())["runs"]
    keys = {protocol.RunCache.key(r["config"], r["split"], r["threads"], r.get("revision", 0)) for r in runs}
    assert len(runs) == 259 and len(keys) == len(runs)


def _planned(bench, script: str):
    """(name, overrides, level, seed, split) of every run a script's committed table shows, and its rows file."""
    module = bench(script)
    if script == "ablation":
        return module.RESULTS / "ablation_rows.json", [
            (row.name, row.overrides, level, seed, split)
            for row, level, seed, split in module.runs(module.ROWS, ["0.5", "0.7", "2:4"], [0, 1, 2],
                                                       ["bench", "dev"])]
    if script == "high_sparsity":
        configs = module.CONFIGS
        return module.RESULTS / "high_sparsity_rows.json", [
            (name, configs[name], level, seed, split)
            for name, level, seed, split in module.runs(configs, list(configs), ["0.5", "0.6", "0.7", "0.8", "2:4"],
                                                        [0, 1, 2], ["0.5", "0.7"], ["bench", "dev"])]
    plan = [(changes, seed) for changes, seed in module.plan(module.MAIN_PARAMS, [1, 2])]
    return module.RESULTS / "tuning_rows.json", [
        (module.config_name(changes), module.overrides_of(changes), level, seed, "dev")
        for changes, seed in plan for level in ("0.5", "0.7")]


@pytest.mark.parametrize("script, found", [("ablation", 102), ("high_sparsity", 132), ("tune", 30)])
def test_a_rows_file_is_found_by_its_script(bench, script, found):
    """Every stored row of the table is found by the run its script plans today, through the canonical config (the
    rows were written with the flat option names of an earlier release; the tuning sweep's row names changed with
    them), and the rows file is not rewritten."""
    rows_file, planned = _planned(bench, script)
    protocol = bench("protocol")
    from optimum_d2prune import D2PruneConfig

    for name, overrides, level, _, _ in planned:  # today's names: the config takes them as they are
        D2PruneConfig(**protocol.level_kwargs(level), **overrides)
    before = rows_file.read_bytes()
    table = protocol.Protocol(protocol.ProtocolSettings(), protocol.RowStore(rows_file, protocol.ProtocolSettings()),
                              protocol.RunCache(None, protocol.ProtocolSettings()))
    rows = [table.finished(*run) for run in planned]
    stored = [r for r in table.store.rows.values() if "config" in r]
    assert len({id(r) for r in rows if r is not None}) == len(stored) == found
    assert table._model is None and rows_file.read_bytes() == before


def test_zeroshot_rows_match_todays_configs_but_the_2_4_d2prune_row(bench):
    """The 2:4 D²Prune row ran with the earlier N:M default (the dynamic q/k/v choice); today's default updates every
    projection at N:M, so a rerun refuses that row instead of reusing it."""
    zeroshot, protocol = bench("zeroshot"), bench("protocol")
    rows = json.loads((RESULTS / "zeroshot_rows.json").read_text())["rows"]
    differ = {key: protocol.canonical(r["config"], 0)["method_options"].get("skip_update")
              for key, r in rows.items() if r["config"] is not None
              and protocol.canonical(r["config"], 0) != protocol.canonical(zeroshot.method_config(r["method"],
                                                                                                   r["level"]), 0)}
    assert differ == {"d2prune|2:4": "dynamic"}
