"""`D2PruneConfig`: strict typing of every value, JSON round-trips, records written with the flat format of earlier
releases (tests/fixtures/legacy_records, written by tests/fixtures/make_legacy_records.py) and records from newer
releases."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from tinymodels import FIXTURES

from optimum_d2prune import D2PruneConfig, RuntimeOptions
from optimum_d2prune.errors import ConfigError, D2PruneError

LEGACY = FIXTURES / "legacy_records"

# ------------------------------------------------------------------ strict typing
REFUSED = [
    ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0.0, 1.0\)"),
    ({"sparsity": -0.1}, r"`sparsity` must be a number in \[0.0, 1.0\)"),
    ({"sparsity": "half"}, r"`sparsity` must be a finite number"),
    ({"sparsity": True}, r"`sparsity` must be a finite number"),
    ({"sparsity": float("nan")}, r"`sparsity` must be a finite number"),
    ({"sparsity": torch.tensor([0.5])}, r"`sparsity` must be a finite number"),
    ({"mask_structure": "5:4"}, r"0 < N < M"),
    ({"mask_structure": "2-4"}, r"\"N:M\""),
    ({"method": "obc"}, r"`method` must be one of"),
    ({"method_options": {"skip_update": "o"}}, r"`skip_update` must be one of"),
    ({"method_options": {"strategy": "ppl"}}, r"`strategy` must be one of"),
    ({"method_options": {"activation_scale": 0}}, r"`activation_scale` must be a number > 0"),
    ({"method_options": {"activation_scale": "big"}}, r"`activation_scale` must be a positive number or \"auto\""),
    ({"method_options": {"damp_percent": 0}}, r"`damp_percent` must be a number in \(0.0, 1.0\)"),
    ({"method_options": {"block_size": 0}}, r"`block_size` must be an integer >= 1"),
    ({"method_options": {"block_size": True}}, r"`block_size` must be an integer >= 1, got True"),
    ({"method_options": {"refit_steps": 2.0}}, r"`refit_steps` must be an integer"),
    ({"method_options": {"kl_weight": -1}}, r"`kl_weight` must be a number >= 0"),
    ({"method_options": {"kl_weight": float("inf")}}, r"`kl_weight` must be a finite number"),
    ({"method_options": {"nope": 1}}, r"`method_options` of d2prune has no option\(s\) \['nope'\]"),
    ({"method": "wanda", "method_options": {"refit_steps": 4}}, r"has no option\(s\) \['refit_steps'\]"),
    ({"allocation": "owl", "mask_structure": "2:4"}, r"needs unstructured sparsity"),
    ({"allocation": "layerwise"}, r"`allocation` must be one of"),
    ({"allocation": "owl", "allocation_options": {"deviation": 0.6}}, r"`deviation` must be a number in"),
    ({"allocation": "owl", "allocation_options": {"deviation": -0.1}}, r"`deviation` must be a number in"),
    ({"allocation": "owl", "allocation_options": {"outlier_threshold": 0}},
     r"`outlier_threshold` must be a number > 0"),
    ({"allocation": "uniform", "allocation_options": {"deviation": 0.1}}, r"has no option\(s\) \['deviation'\]"),
    ({"method_options": {"refit_tolerance": 1.5}}, r"`refit_tolerance` must be a number in \[0.0, 1.0\)"),
    ({"method_options": {"refit_tolerance": "tight"}}, r"`refit_tolerance` must be a finite number"),
    ({"method_options": {"refit_budget": 1}}, r"`refit_budget` must be True or False"),
    ({"method_options": {"kl_query_rows": 0}}, r"`kl_query_rows` must be an integer >= 1"),
    ({"method_options": {"kl_query_rows": 64.0}}, r"`kl_query_rows` must be an integer"),
    ({"method_options": {"measure_flips": "yes"}}, r"`measure_flips` must be True or False"),
    ({"method_options": {"admm_steps": -1}}, r"`admm_steps` must be an integer >= 0"),
    ({"method_options": {"admm_steps": 2.5}}, r"`admm_steps` must be an integer"),
    ({"method": "wanda", "method_options": {"admm_steps": 10}}, r"has no option\(s\) \['admm_steps'\]"),
    ({"method_options": {"block_size": 6}, "mask_structure": "2:4"}, r"`block_size` \(6\) is not a multiple of M=4"),
    ({"reconstruction": "yes"}, r"`reconstruction` must be True or False"),
    ({"reconstruction": True, "reconstruction_options": {"targets": "everything"}}, r"`targets` must be one of"),
    ({"reconstruction": True, "reconstruction_options": {"refit_steps": 0}}, r"`refit_steps` must be an integer >= 1"),
    ({"sequential": 1}, r"`sequential` must be True or False"),
    ({"preset": "fast"}, r"`preset` must be None or one of"),
    ({"reconstruction_options": {"targets": "all"}}, r"`reconstruction` is off"),
    ({"reconstruction": True, "reconstruction_options": {"reference": "x"}}, r"`reference` must be one of"),
    ({"ignore": "mlp"}, r"`ignore` must be a list"),
    ({"targets": ["("]}, r"invalid regex"),
    ({"targets": []}, r"`targets` is empty"),
    ({"runtime": {"device": "nonsense"}}, r"`device` must be a torch device"),
    ({"runtime": {"kl_chunk_mib": 0}}, r"`kl_chunk_mib` must be an integer >= 1"),
    ({"runtime": {"on_nonfinite": "ignore"}}, r"`on_nonfinite` must be one of"),
]


@pytest.mark.parametrize("kwargs,match", REFUSED, ids=[str(k) for k, _ in REFUSED])
def test_invalid_values_are_refused_with_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        D2PruneConfig(**kwargs)
    assert isinstance(info.value, D2PruneError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5).double()],
                         ids=["np.float32", "np.float64", "torch-0d", "torch-0d-double"])
def test_numpy_and_0d_torch_scalars_are_accepted_as_python_numbers(value):
    config = D2PruneConfig(sparsity=value, method_options={"kl_weight": value * 4})
    assert type(config.sparsity) is float and config.sparsity == 0.5
    assert type(config.method_options.kl_weight) is float and config.method_options.kl_weight == 2.0
    assert config == D2PruneConfig(sparsity=0.5, method_options={"kl_weight": 2.0})
    json.dumps(config.to_dict())  # plain JSON values, no numpy/torch scalar left


def test_integer_scalars_of_numpy_are_accepted_and_floats_refused_for_integers():
    config = D2PruneConfig(method_options={"block_size": np.int64(64)})
    assert type(config.method_options.block_size) is int and config.method_options.block_size == 64
    with pytest.raises(ConfigError, match="`block_size` must be an integer"):
        D2PruneConfig(method_options={"block_size": np.float32(64.0)})


def test_runtime_device_is_normalised_and_never_serialised():
    config = D2PruneConfig(runtime=RuntimeOptions(device="cpu", kl_chunk_mib=8))
    assert config.runtime.device == "cpu"
    assert "runtime" not in config.to_dict() and "device" not in json.dumps(config.to_dict())
    assert config == D2PruneConfig()  # where a run executes is not part of what it does


# ------------------------------------------------------------------ round-trips
ROUND_TRIPS = [
    {},
    {"mask_structure": "4:8", "method_options": {"lambda2": -0.5, "kl_weight": 0.5}, "ignore": ["lm_head"]},
    {"sparsity": 0.7, "preset": "max_quality"},
    {"sparsity": 0.8, "preset": "max_quality", "reconstruction_options": {"reference": "model", "targets": "all"}},
    {"preset": "paper"},
    {"mask_structure": "2:4", "preset": "max_quality"},
    {"method": "sparsegpt", "method_options": {"refit_steps": 4, "refit_budget": False}},
    {"method": "wanda", "sequential": True, "targets": [r"mlp\."]},
    {"method": "magnitude", "allocation": "owl", "allocation_options": {"deviation": 0.05}},
]


@pytest.mark.parametrize("kwargs", ROUND_TRIPS, ids=[str(k) for k in ROUND_TRIPS])
def test_to_dict_from_dict_and_json_round_trip(kwargs, tmp_path):
    config = D2PruneConfig(**kwargs)
    assert D2PruneConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "config.json"
    config.to_json_file(path)
    assert D2PruneConfig.from_json_file(path) == config
    record = json.loads(path.read_text())
    assert record["meta"]["producer"] == "optimum-d2prune" and record["sparsity"] == config.sparsity


# ------------------------------------------------------------------ records of earlier releases
#: record (tests/fixtures/legacy_records) -> the equivalent configuration
LEGACY_CASES = {
    "default": D2PruneConfig(),
    "nm_2of4": D2PruneConfig(mask_structure="2:4"),
    # the record holds the budgets it ran with: the preset's OWL applied from 75 % only, uniform at 50 %
    "max_quality": D2PruneConfig(preset="max_quality", allocation="uniform"),
    "paper": D2PruneConfig(preset="paper"),
    # an explicit step count ran as given, uncapped by the token budget
    "sparsegpt_refine4": D2PruneConfig(method="sparsegpt", method_options={"refit_steps": 4, "refit_budget": False}),
}


def test_every_legacy_record_has_a_case():
    assert sorted(p.stem for p in LEGACY.glob("*.json")) == sorted(LEGACY_CASES)


@pytest.mark.parametrize("name", sorted(LEGACY_CASES))
def test_records_of_the_flat_format_load_as_the_equivalent_config(name, caplog):
    record = json.loads((LEGACY / f"{name}.json").read_text())
    assert "refine_tolerance" in record["config"]  # a flat record indeed
    with caplog.at_level(logging.WARNING, logger="optimum_d2prune"):
        config = D2PruneConfig.from_json_file(LEGACY / f"{name}.json")
    assert config == LEGACY_CASES[name]
    assert not caplog.records  # every flat field is known: nothing is dropped silently or with a warning
    assert D2PruneConfig.from_dict(record["config"]) == config
    assert D2PruneConfig.from_dict(config.to_dict()) == config


def test_legacy_attention_update_names_what_is_updated_and_skip_update_what_is_not():
    base = {"sparsity": 0.5, "method": "d2prune"}
    expected = {"all": "none", "none": "qkv", "v": "v", "dynamic": "dynamic"}
    for old, new in expected.items():
        config = D2PruneConfig.from_dict({**base, "attention_update": old})
        assert config.method_options.skip_update == new, old


def test_legacy_owl_and_reconstruction_fields_go_to_their_groups():
    config = D2PruneConfig.from_dict({"sparsity": 0.8, "sparsity_allocation": "owl", "owl_lambda": 0.05, "owl_m": 7,
                                      "block_reconstruction": True, "reconstruction_targets": "all",
                                      "reconstruction_reference": "model", "dynamic_strategy": "layer",
                                      "kl_num_samples": 2, "seed": 3, "device": "cpu"})
    assert config.allocation == "owl" and config.reconstruction is True
    assert (config.allocation_options.deviation, config.allocation_options.outlier_threshold) == (0.05, 7.0)
    assert (config.reconstruction_options.targets, config.reconstruction_options.reference) == ("all", "model")
    assert (config.method_options.strategy, config.method_options.kl_samples) == ("layer", 2)
    assert config.runtime == RuntimeOptions()  # runtime fields of a record are not applied


# ------------------------------------------------------------------ records of newer releases
def test_unknown_field_from_a_newer_release_loads_with_a_warning(caplog):
    config = D2PruneConfig(sparsity=0.6)
    record = {**config.to_dict(), "future_knob": 3}
    record["meta"] = {"producer": "optimum-d2prune", "version": "9.9.0"}
    with caplog.at_level(logging.WARNING, logger="optimum_d2prune"):
        loaded = D2PruneConfig.from_dict(record)
    assert loaded == config
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "future_knob" in warnings[0] and "9.9.0" in warnings[0]


def test_a_record_that_is_not_a_dict_is_refused():
    with pytest.raises(ConfigError, match="dict is expected"):
        D2PruneConfig.from_dict(["sparsity", 0.5])
