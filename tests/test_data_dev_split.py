"""Document ranges of .jsonl sources (the BENCH.md v1.1 dev split): calibration on some documents, perplexity on
others, with errors that say what is wrong."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, make_tiny
from optimum_d2prune.calibration import get_calibration_dataset, load_documents, select_documents
from optimum_d2prune.evaluation import perplexity
from test_data_eval import CharTokenizer, reference_c4_sampling

NOTES = FIXTURES / "pruning_notes.jsonl"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def notes() -> list[str]:
    return [json.loads(line)["text"] for line in NOTES.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("documents, expected", [
    (range(0, 5), slice(0, 5)),
    (range(5, 8), slice(5, 8)),
    (slice(5, None), slice(5, 8)),
    (slice(None, 3), slice(0, 3)),
    (None, slice(None)),
])
def test_load_documents_keeps_the_range(documents, expected):
    docs, is_corpus = load_documents(NOTES, documents=documents)
    assert not is_corpus and docs == notes()[expected]


def test_calibration_samples_only_the_range_with_sparsegpt_sampling():
    tok = CharTokenizer()
    batches = get_calibration_dataset(NOTES, tok, num_samples=6, seq_len=300, seed=2, documents=range(0, 5))
    expected = reference_c4_sampling(notes()[:5], tok, 6, 300, 2)
    assert all(torch.equal(b["input_ids"], e) for b, e in zip(batches, expected))
    # every window lies inside one of the first five documents
    texts = notes()[:5]
    for b in batches:
        window = b["input_ids"][0].tolist()
        assert any(_contains(tok(t).input_ids[0].tolist(), window) for t in texts)


def _contains(seq: list[int], window: list[int]) -> bool:
    n = len(window)
    return any(seq[i : i + n] == window for i in range(len(seq) - n + 1))


def test_perplexity_on_a_range_is_the_range_joined_by_blank_lines(tmp_path):
    model = make_tiny("llama")
    tok = CharTokenizer()
    joined = tmp_path / "held_out.txt"
    joined.write_text("\n\n".join(notes()[5:8]), encoding="utf-8")
    on_range = perplexity(model, tok, NOTES, seq_len=64, max_windows=4, documents=range(5, 8))
    assert on_range == pytest.approx(perplexity(model, tok, joined, seq_len=64, max_windows=4), rel=1e-6)
    assert on_range != pytest.approx(perplexity(model, tok, NOTES, seq_len=64, max_windows=4), rel=1e-6)


@pytest.mark.parametrize("documents, message", [
    (range(0, 9), r"\[0, 9\) goes past the 8 documents"),
    (slice(6, 20), r"\[6, 20\) goes past the 8 documents"),
    (range(0, 8, 2), "contiguous"),
    (range(3, 3), "at least one document"),
    (slice(-2, None), "non-negative"),
    ((0, 5), "range or slice"),
    (slice(0.5, 3), "slice start must be an integer"),
])
def test_bad_ranges_say_what_is_wrong(documents, message):
    with pytest.raises(ValueError, match=message):
        get_calibration_dataset(NOTES, CharTokenizer(), num_samples=1, seq_len=50, documents=documents)


def test_a_range_needs_documents_not_a_running_text():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="one running text; drop `documents` or pass a .jsonl file"):
        perplexity(model, CharTokenizer(), FIXTURES / "pruning_notes.txt", seq_len=32, documents=range(0, 2))
    with pytest.raises(ValueError, match="not of given token sequences"):
        perplexity(model, CharTokenizer(), [{"input_ids": torch.zeros(1, 8, dtype=torch.long)}], documents=range(1))


def test_select_documents_is_a_plain_slice():
    assert select_documents(list("abcdef"), range(2, 4)) == ["c", "d"]
    assert select_documents(list("abcdef"), None) == list("abcdef")


# ------------------------------------------------------------------ the benchmark row store
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


# ------------------------------------------------------------------ the real dev split
def test_dev_split_of_the_c4_sample(shared_data, tokenizer_dir):
    """BENCH.md v1.1: 700 calibration documents, and documents 700-799 give at least 32 windows of 512 tokens."""
    from transformers import AutoTokenizer

    c4 = shared_data / "c4_train_sample.jsonl"
    calibration, _ = load_documents(c4, documents=range(0, 700))
    held_out, _ = load_documents(c4, documents=range(700, 800))
    everything, _ = load_documents(c4)
    assert len(everything) == 800 and calibration + held_out == everything
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer("\n\n".join(held_out), return_tensors="pt").input_ids.shape[1] >= 32 * 512
