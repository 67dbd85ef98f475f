"""Zero-shot evaluation through lm-eval on the local copies of the 7 tasks (tiny model, a few examples)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from optimum_d2prune.evaluation import PAPER_TASKS, zero_shot
from optimum_d2prune.evaluation.tasks import local_data
from optimum_d2prune.evaluation.zeroshot import TASKS_DIR, check_tasks

# counts and label balance from shared/data/zeroshot/SOURCES.md
EXPECTED = {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
            "arc_challenge": 1172, "openbookqa": 500}


@pytest.fixture(scope="module")
def data_dir(shared_data):
    return shared_data / "zeroshot"


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_local_loaders_match_lm_eval_fields(task, data_dir):
    dataset = getattr(local_data, f"load_{task}")(data_dir=str(data_dir), version=1.0)  # metadata kwargs ignored
    (split, rows), = dataset.items()
    assert split == local_data.FILES[task][1] and len(rows) == EXPECTED[task]
    first = rows[0]
    if task == "boolq":
        assert sum(rows["label"]) == 2033 and set(rows["label"]) == {0, 1}
        assert {"question", "passage"} <= set(first)
    elif task == "rte":
        assert rows["label"].count(0) == 146 and {"sentence1", "sentence2"} <= set(first)
    elif task == "hellaswag":
        assert [rows["label"].count(i) for i in range(4)] == [2515, 2485, 2584, 2458]
        assert first["query"] == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalized
        assert len(first["choices"]) == 4
    elif task == "winogrande":
        assert first["answer"] in ("1", "2") and "_" in first["sentence"]
        assert local_data.winogrande_doc_to_choice(first)[0].endswith(first["option1"])
    else:
        assert first["answerKey"] in first["choices"]["label"]
        assert ("question_stem" if task == "openbookqa" else "question") in first


class _IgnoreTags(yaml.SafeLoader):
    pass


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {loader.construct_scalar(node)}")


@pytest.mark.parametrize("task, lm_eval_yaml", [
    ("boolq", "super_glue/boolq/default.yaml"), ("rte", "glue/rte/default.yaml"),
    ("hellaswag", "hellaswag/hellaswag.yaml"), ("arc_easy", "arc/arc_easy.yaml"),
    ("openbookqa", "openbookqa/openbookqa.yaml"),
])
def test_prompts_are_lm_eval_s(task, lm_eval_yaml):
    """Same prompt, target, choices and metrics as lm-eval's own task (only the data source differs)."""
    import lm_eval

    theirs = yaml.load((Path(lm_eval.__file__).parent / "tasks" / lm_eval_yaml).read_text(), Loader=_IgnoreTags)
    ours = yaml.load((TASKS_DIR / f"d2prune_{task}.yaml").read_text(), Loader=_IgnoreTags)
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice"):
        assert ours[key] == theirs[key], key
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in theirs["metric_list"]]


def test_zero_shot_on_tiny_model(tokenizer_dir, data_dir):
    from tinymodels import tiny_llama_for
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_llama_for(tokenizer)
    results = zero_shot(model, tokenizer, data_dir=data_dir, limit=3, batch_size=4)
    assert list(results.metrics) == list(PAPER_TASKS)
    assert all(results.samples[t] == 3 for t in PAPER_TASKS)
    for task, metrics in results.metrics.items():
        assert 0.0 <= metrics["acc"] <= 1.0
        assert ("acc_norm" in metrics) == (task in ("hellaswag", "arc_easy", "arc_challenge", "openbookqa"))
    scores = results.scores()
    assert scores["hellaswag"] == results.metrics["hellaswag"]["acc_norm"] and scores["arc_easy"] == results.metrics["arc_easy"]["acc"]
    assert math.isclose(results.mean, sum(scores.values()) / 7)
    for task, p in scores.items():  # lm-eval's closed-form standard error of a mean of 0/1 outcomes
        assert math.isclose(results.stderrs()[task], math.sqrt(p * (1 - p) / (3 - 1)), abs_tol=1e-9)
    assert math.isclose(results.mean_stderr, math.sqrt(sum(e * e for e in results.stderrs().values())) / 7)
    table = results.table()
    assert table.count("\n") == 2 + 7 and "**mean**" in table
    assert not model.training


def test_bad_zero_shot_input(tmp_path, data_dir):
    with pytest.raises(ValueError, match="no local loader"):
        check_tasks(["boolq", "mmlu"], data_dir)
    with pytest.raises(FileNotFoundError, match="boolq/val.jsonl"):
        check_tasks(["boolq"], tmp_path)
    with pytest.raises(ValueError, match="non-empty list"):
        check_tasks("boolq", data_dir)
    with pytest.raises(ValueError, match="limit"):
        zero_shot(None, None, ["rte"], data_dir=data_dir, limit=0)
