"""The generated support table is current, and the CLI reaches a non-LLaMA family."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimum_d2prune.architectures.support_table import documents, replace_between_markers, support_table

ROOT = Path(__file__).resolve().parents[1]


def test_committed_support_tables_are_current():
    table = support_table()
    for path in documents(ROOT):
        text = path.read_text()
        assert replace_between_markers(text, table) == text, (
            f"{path.name} is stale: run `python -m optimum_d2prune.architectures.support_table --write`")
    for family in ("qwen2", "gemma2", "phi3", "gpt2", "gpt-neox", "qwen3-moe", "mixtral", "dinov2"):
        assert f"| {family} |" in table


def _tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    words.update({f"w{i}": i for i in range(4, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("family", ["qwen2", "qwen3-moe"])
def test_cli_prunes_a_saved_non_llama_model(family, tmp_path):
    """`python -m optimum_d2prune` (what `optimum-cli d2prune` runs) on a saved tiny model of a family without a
    hand-written adapter: the pruner's generic path is what the CLI reaches."""
    import transformers

    from optimum_d2prune.testing.families import VOCAB, make_family

    model_dir, out = tmp_path / "model", tmp_path / "out"
    make_family(family).save_pretrained(model_dir)
    _tiny_tokenizer(VOCAB).save_pretrained(model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "optimum_d2prune", "--model", str(model_dir), "--output-dir", str(out),
         "--calibration", "self", "--num-samples", "2", "--seq-len", "16", "--device", "cpu", "--method",
         "sparsegpt", "--no-report"],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out)
    weights = [m.weight for m in pruned.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    if family == "qwen3-moe":
        weights += [p for n, p in pruned.named_parameters() if ".experts." in n]
    assert weights
    for w in weights:
        assert int((w == 0).sum()) == w.numel() // 2
