"""Costly requests are refused before the model loads: self-generated text above the cap (unless --force), and
zero-shot tasks whose data cannot be had."""

from __future__ import annotations

import json
import math

import pytest

from optimum_d2prune.commands import main
from optimum_d2prune.commands.checks import check_arguments
from optimum_d2prune.commands.d2prune import build_parser


@pytest.fixture
def no_model_load(monkeypatch):
    import optimum_d2prune.models as models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("the model loaded despite the refusal"))


# case -> (arguments, texts the one-line error must hold)
TOO_COSTLY = {
    "a typo in --eval-samples": (["--eval-samples", "100000000"],
                                 ["--eval self would generate 100,000,000 x 512 = 51,200,000,000 tokens", "--force",
                                  "--eval-samples / --eval-seq-len"]),
    "a huge self-calibration": (["--num-samples", "100000", "--seq-len", "256", "--eval", "none"],
                                ["--calibration self would generate 100,000 x 256 = 25,600,000 tokens",
                                 "--num-samples / --seq-len", "--force"]),
}


@pytest.mark.parametrize("case", sorted(TOO_COSTLY))
def test_costly_generation_is_refused_before_the_model_loads(case, tiny_checkpoint, tmp_path, capsys, no_model_load):
    extra, expected = TOO_COSTLY[case]
    code = main(["--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "out"), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    for text in expected:
        assert text in err, text
    assert "about " in err and "parameters on cpu" in err  # the time estimate from the checkpoint's size
    assert not (tmp_path / "out").exists()


def test_force_lifts_the_cap(tmp_path):
    argv = ["--model", "smollm2", "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--eval-samples",
            "100000000"]
    with pytest.raises(ValueError, match="--force"):
        check_arguments(build_parser().parse_args(argv))
    assert check_arguments(build_parser().parse_args([*argv, "--force"])).sparsity == 0.5


def test_a_large_model_on_cpu_is_refused_by_its_estimated_time(tmp_path, monkeypatch):
    """Default sizes, a 70B-parameter model on the CPU: few tokens, but days of generation."""
    import optimum_d2prune.calibration as calibration

    monkeypatch.setattr(calibration, "estimate_parameters", lambda model, gguf_file=None: 70 * 10**9)
    args = build_parser().parse_args(["--model", "big/model", "--output-dir", str(tmp_path / "o"), "--device", "cpu"])
    with pytest.raises(ValueError, match=r"32 x 512 = 16,384 tokens, about [\d.]+ h.* 70,000M parameters on cpu"):
        check_arguments(args)


def test_parameters_are_read_from_the_files_headers(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    from optimum_d2prune.calibration import estimate_parameters

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    stored = {n: p.numel() for n, p in model.state_dict().items()}
    assert estimate_parameters(str(tiny_checkpoint)) == sum(stored.values()) - (
        stored["lm_head.weight"] if model.config.tie_word_embeddings else 0)
    assert estimate_parameters("smollm2") == 134_515_008  # SmolLM2-135M's GGUF tensor infos
    assert estimate_parameters("some/hub-id") is None


def test_generation_seconds_scale_with_model_and_device():
    from optimum_d2prune.calibration import GenerationJob, estimate_generation_seconds

    job = GenerationJob("--calibration self", 32, 512, "")
    cpu = estimate_generation_seconds(job, 135 * 10**6, "cpu")
    assert 60 < cpu < 300  # SmolLM2-135M, 32 x 512 tokens on 2 cores: about two minutes
    assert math.isclose(estimate_generation_seconds(job, 270 * 10**6, "cpu"), 2 * cpu)
    assert estimate_generation_seconds(job, 135 * 10**6, "cuda:0") < cpu / 5


# ------------------------------------------------------------------ zero-shot, before anything loads
@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "datasets-cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _cache_dataset(cache, path: str, config: str) -> None:
    """The layout `datasets` writes when it has prepared a dataset (what it reads back offline)."""
    folder = cache / "___".join(path.split("/")) / config / "0.0.0" / "abc123"
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text(json.dumps({"config_name": config}))


def test_zero_shot_tasks_not_cached_are_refused_offline(tiny_checkpoint, tmp_path, capsys, no_model_load,
                                                        offline_empty_cache):
    _cache_dataset(offline_empty_cache, "allenai/ai2_arc", "ARC-Easy")
    code = main(["--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "out"), "--device", "cpu",
                 "--zero-shot", "arc_easy,boolq,rte"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Zero-shot tasks boolq, rte need their datasets" in err and "--zero-shot-data" in err
    assert "arc_easy" not in err.split("need their datasets")[0]  # cached: not named
    from optimum_d2prune.evaluation.zeroshot import check_tasks

    check_tasks(["arc_easy"])  # the cached task alone passes, offline


def test_zero_shot_without_lm_eval_says_how_to_install_it(tmp_path, capsys, monkeypatch, no_model_load):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    code = main(["--model", "smollm2", "--output-dir", str(tmp_path / "out"), "--zero-shot", "rte"])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "optimum-d2prune[zeroshot]"' in err


def test_missing_local_task_files_name_the_tasks(tmp_path):
    from optimum_d2prune.evaluation.zeroshot import check_tasks

    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "val.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match=r"for tasks boolq, winogrande: .*boolq/val\.jsonl"):
        check_tasks(["boolq", "rte", "winogrande"], tmp_path)
