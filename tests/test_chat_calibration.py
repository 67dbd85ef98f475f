"""Chat models are calibrated on conversations through their chat template: self-generated ones (seed prompts, the
model's own replies) and `messages` records of a .jsonl file (SmolLM2's tokenizer, a tiny model)."""

from __future__ import annotations

import copy
import json

import pytest
from tinymodels import tiny_llama_for

from optimum_d2prune.calibration import (
    SEED_PROMPTS,
    check_text_source,
    get_calibration_dataset,
    self_generated_calibration,
)
from optimum_d2prune.errors import InputError


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _positions(ids: list[int], pattern: list[int]) -> list[int]:
    return [i for i in range(len(ids) - len(pattern) + 1) if ids[i : i + len(pattern)] == pattern]


def test_self_calibration_samples_conversations(tokenizer, monkeypatch):
    import optimum_d2prune.calibration.selfcalib as selfcalib

    monkeypatch.setattr(selfcalib, "MAX_REPLY_TOKENS", 6)  # a random model rarely ends its turn: cut replies short
    batches = self_generated_calibration(tiny_llama_for(tokenizer), tokenizer, num_samples=2, seq_len=160, seed=0)
    opening = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = set()
    for batch in batches:
        ids = batch["input_ids"][0].tolist()
        text = tokenizer.decode(ids)
        assert len(ids) == 160 and text.startswith("<|im_start|>system\n")
        starts = _positions(ids, opening)
        assert len(starts) >= 3  # several conversations per sequence
        for start in starts[:-1]:
            reply = ids[start + len(opening) :]
            assert end_of_turn in reply[:6]  # each reply closed by the template's end of turn
        for turn in text.split("<|im_start|>user\n")[1:]:
            prompts.add(turn.split("<|im_end|>")[0])
    assert prompts and prompts <= set(SEED_PROMPTS) and len(prompts) >= 3


def test_chat_off_is_plain_text_and_on_needs_a_template(tokenizer):
    model = tiny_llama_for(tokenizer)
    plain = self_generated_calibration(model, tokenizer, num_samples=1, seq_len=24, seed=0, chat="off")
    assert not tokenizer.decode(plain[0]["input_ids"][0]).startswith("<|im_start|>system")
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(InputError, match="chat template"):
        self_generated_calibration(model, no_template, num_samples=1, seq_len=8, chat="on")


def _conversations(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]


def test_messages_records_are_calibrated_on_through_the_template(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    records = _conversations(6)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    source = check_text_source(path, tokenizer, 96, "calibration", "--calibration", "--seq-len")
    assert source.chat and source.documents == 6
    rendered = [tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False),
                          add_special_tokens=False).input_ids for r in records]
    batches = get_calibration_dataset(source, tokenizer, num_samples=3, seq_len=96, seed=0)
    for batch in batches:
        ids = batch["input_ids"][0].tolist()
        assert len(ids) == 96
        while ids:  # conversations end to end, cut at seq_len
            match = next(r for r in rendered if ids[: len(r)] == r[: len(ids)])
            ids = ids[len(match) :]


def test_messages_need_a_chat_template_named_at_the_record(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _conversations(2)), encoding="utf-8")
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(InputError, match=rf"{path}:1: .*needs a tokenizer with a chat template"):
        check_text_source(path, no_template, 16, "calibration", "--calibration", "--seq-len")


def test_the_cli_records_chat_calibration_and_refuses_chat_off_on_messages(tiny_checkpoint, tmp_path, capsys,
                                                                           monkeypatch):
    from optimum_d2prune.commands import main

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _conversations(3)), encoding="utf-8")
    base = ["--model", str(tiny_checkpoint), "--num-samples", "2", "--seq-len", "16", "--device", "cpu",
            "--method", "magnitude", "--no-report", "--eval", "none"]
    assert main([*base, "--output-dir", str(tmp_path / "self")]) == 0
    record = json.loads((tmp_path / "self" / "d2prune_config.json").read_text())["calibration"]
    assert record["source"] == "self" and record["chat"] is True
    import optimum_d2prune.models as models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("the model loaded despite bad input"))
    code = main([*base, "--output-dir", str(tmp_path / "off"), "--calibration", str(path), "--chat-template", "off"])
    assert code == 2 and "drop --chat-template off" in capsys.readouterr().err
