"""The protocol's tools for the scripts: `--set` overrides in today's grouped names, rows found by the config they
ran, the users' results page rewritten section by section, results files portable between machines."""

from __future__ import annotations

import dataclasses
import json

import pytest


@pytest.mark.parametrize("pairs, expected", [
    (["kl_weight=3"], {"method_options": {"kl_weight": 3}}),
    (["method_options.kl_weight=3", "skip_update=v"], {"method_options": {"kl_weight": 3, "skip_update": "v"}}),
    (["preset=max_quality", "allocation=owl"], {"preset": "max_quality", "allocation": "owl"}),
    (["deviation=0.04"], {"allocation_options": {"deviation": 0.04}}),
    (["reference=model", "reconstruction=true"],
     {"reconstruction_options": {"reference": "model"}, "reconstruction": True}),
    (["reconstruction_options.refit_steps=16", "kl_query_rows=none"],
     {"reconstruction_options": {"refit_steps": 16}, "method_options": {"kl_query_rows": None}}),
    (["skip_update=none", "kl_query_rows=None"], {"method_options": {"skip_update": "none", "kl_query_rows": None}}),
    (["offload_activations=true"], {"runtime": {"offload_activations": True}}),
    (["method=sparsegpt", "admm_steps=12"], {"method": "sparsegpt", "method_options": {"admm_steps": 12}}),
])
def test_overrides_take_todays_grouped_names(bench, pairs, expected):
    assert bench("protocol").parse_overrides(pairs) == expected


@pytest.mark.parametrize("pairs, message", [
    (["refit_steps=4"], "method_options.refit_steps or reconstruction_options.refit_steps"),
    (["attention_update=v"], "write 'method_options.skip_update'"),
    (["sparsity_allocation=owl"], "write 'allocation'"),
    (["owl_lambda=0.04"], "write 'allocation_options.deviation'"),
    (["seed=1"], "not part of a config"),
    (["method=sparsegpt", "kl_weight=3"], "unknown override 'kl_weight'"),
    (["method_options.nope=1"], "unknown override 'method_options.nope'"),
    (["kl_weight"], "expected KEY=VALUE"),
])
def test_overrides_refuse_what_no_group_takes(bench, pairs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        bench("protocol").parse_overrides(pairs)


def test_describe_and_merge_overrides(bench):
    protocol = bench("protocol")
    base = {"method": "d2prune", "method_options": {"skip_update": "dynamic", "strategy": "layer"}}
    merged = protocol.merge_overrides(base, {"method_options": {"kl_weight": 3.0}, "preset": "paper"})
    assert merged == {"method": "d2prune", "preset": "paper",
                      "method_options": {"skip_update": "dynamic", "strategy": "layer", "kl_weight": 3.0}}
    assert base["method_options"] == {"skip_update": "dynamic", "strategy": "layer"}
    assert protocol.describe_overrides(merged) == ("method=d2prune, method_options.skip_update=dynamic, "
                                                   "method_options.strategy=layer, method_options.kl_weight=3.0, "
                                                   "preset=paper")


def test_a_row_stored_under_an_earlier_name_is_found_by_its_config(tmp_path, bench):
    """A row named and configured with an earlier release's flat option names (`refine_steps`) is today's
    `refit_steps` row: found without a run and without rewriting the rows file; a row of another config under that
    name is not taken for it."""
    protocol = bench("protocol")
    from optimum_d2prune import D2PruneConfig

    settings = protocol.ProtocolSettings(num_samples=2, eval_windows=2)
    flat = {"sparsity": 0.5, "mask_structure": "unstructured", "method": "d2prune", "refine_steps": 0,
            "refine_tolerance": 0.15, "attention_update": "dynamic", "sparsity_allocation": "uniform", "seed": 0}
    path = tmp_path / "rows.json"
    store = protocol.RowStore(path, settings)
    store.add({"name": "refine_steps=0", "level": "0.5", "seed": 0, "split": "dev", "ppl": 66.8,
               "overrides": {"refine_steps": 0}, "config": flat})
    before = path.read_bytes()
    bench_ = protocol.Protocol(settings, protocol.RowStore(path, settings))
    row = bench_.finished("refit_steps=0", {"method_options": {"refit_steps": 0}}, "0.5", 0, "dev")
    assert row["ppl"] == 66.8 and bench_.store.get("refit_steps=0", "0.5", 0, "dev") is row
    assert bench_.finished("refit_steps=4", {"method_options": {"refit_steps": 4}}, "0.5", 0, "dev") is None
    assert path.read_bytes() == before and bench_._model is None
    # `refit_budget` is moot without refit steps: the capped and uncapped no-refit configs are one run
    capped = protocol.canonical(D2PruneConfig(method_options={"refit_steps": 0, "refit_budget": True}), 0)
    assert capped == protocol.canonical(flat, 0)


def test_results_files_name_the_data_files_not_their_folder(tmp_path, bench):
    """A rows file written on a machine whose benchmark data lives elsewhere is the same protocol; other settings
    are not."""
    protocol = bench("protocol")
    here = protocol.ProtocolSettings(c4="/data/c4_train_sample.jsonl", wikitext="/data/wikitext2_test.txt")
    there = dataclasses.replace(here, c4="/elsewhere/c4_train_sample.jsonl", wikitext="/x/wikitext2_test.txt")
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"protocol": dataclasses.asdict(there), "rows": []}))
    assert protocol.RowStore(path, here).rows == {}
    for other in (dataclasses.replace(there, num_samples=16), dataclasses.replace(there, c4="/data/other.jsonl")):
        path.write_text(json.dumps({"protocol": dataclasses.asdict(other), "rows": []}))
        with pytest.raises(ValueError, match="rows of another protocol"):
            protocol.RowStore(path, here)


def test_a_section_of_the_results_page_is_rewritten_alone(tmp_path, bench):
    protocol = bench("protocol")
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nintro\n\n<!-- results:speed -->\nold table\n<!-- /results:speed -->\n\nnotes\n")
    protocol.write_section("speed", "| new | table |\n", page)
    assert page.read_text() == ("# Results\n\nintro\n\n<!-- results:speed -->\n| new | table |\n"
                                "<!-- /results:speed -->\n\nnotes\n")
    protocol.write_section("memory", "| memory |", page)  # a section the page does not have yet: appended
    assert page.read_text().endswith("notes\n\n<!-- results:memory -->\n| memory |\n<!-- /results:memory -->\n")
    page.write_text("<!-- results:speed -->\nunclosed\n")
    with pytest.raises(ValueError, match="no closing"):
        protocol.write_section("speed", "| new |", page)
    assert page.read_text() == "<!-- results:speed -->\nunclosed\n"
