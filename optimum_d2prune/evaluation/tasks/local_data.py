"""Loaders of the local zero-shot data (one subfolder per task, the layout docs/hub.md gives) into the fields that
lm-eval's own task configs use. Called by lm-eval through `custom_dataset: !function local_data.load_<task>` with
the task metadata, which carries `data_dir` (set by `optimum_d2prune.evaluation.zero_shot`)."""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path
from typing import Any

# task -> file inside data_dir (and the lm-eval split it stands for)
FILES = {
    "boolq": ("boolq/val.jsonl", "validation"),
    "rte": ("rte/val.jsonl", "validation"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2", "validation"),
    "winogrande": ("winogrande/dev.jsonl", "validation"),
    "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl", "test"),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Test.jsonl", "test"),
    "openbookqa": ("openbookqa/test.jsonl", "test"),
}


def task_file(task: str, data_dir: Any) -> Path:
    if not data_dir:
        raise ValueError(f"The local {task} task needs `data_dir` (the folder holding {FILES[task][0]}).")
    return Path(data_dir) / FILES[task][0]


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(task: str, records: list[dict]):
    import datasets

    return datasets.DatasetDict({FILES[task][1]: datasets.Dataset.from_list(records)})


def load_boolq(data_dir: Any = None, **_: Any):
    """`question`, `passage`, `label` (1 = yes, 0 = no, as lm-eval's super_glue boolq)."""
    rows = _jsonl(task_file("boolq", data_dir))
    labels = {"true": 1, "false": 0, True: 1, False: 0}
    return _dataset("boolq", [{"question": r["question"], "passage": r["passage"], "idx": r.get("idx", i),
                               "label": labels[r["label"]]} for i, r in enumerate(rows)])


def load_rte(data_dir: Any = None, **_: Any):
    """`sentence1` (premise), `sentence2` (hypothesis), `label` (0 = entailment, 1 = not, as lm-eval's glue rte)."""
    rows = _jsonl(task_file("rte", data_dir))
    labels = {"entailment": 0, "not_entailment": 1, 0: 0, 1: 1}
    return _dataset("rte", [{"sentence1": r["premise"], "sentence2": r["hypothesis"], "idx": r.get("idx", i),
                             "label": labels[r["label"]]} for i, r in enumerate(rows)])


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's hellaswag/utils.py preprocess()
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _capitalize_ctx_b(query: str) -> str:
    """lm-eval capitalizes `ctx_b`, which the text format merged into `ctx`: capitalize the word after the last
    sentence end when it starts lowercase (the usual ActivityNet case, e.g. "...on a roof. he" -> "He")."""
    cut = query.rfind(". ")
    if cut >= 0 and cut + 2 < len(query) and query[cut + 2].islower():
        return query[: cut + 2] + query[cut + 2].upper() + query[cut + 3 :]
    return query


def load_hellaswag(data_dir: Any = None, **_: Any):
    """The 6-lines-per-item text format (`activity_label: ctx`, gold label, four endings) -> `query`, `choices`,
    `label`, preprocessed as lm-eval's hellaswag task does."""
    path = task_file("hellaswag", data_dir)
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not a multiple of 6 (context, label, 4 endings per item).")
    records = []
    for i in range(0, len(lines), 6):
        query = _capitalize_ctx_b(_hellaswag_preprocess(lines[i]))
        records.append({"query": query, "choices": [_hellaswag_preprocess(e) for e in lines[i + 2 : i + 6]],
                        "label": int(lines[i + 1]), "gold": int(lines[i + 1])})
    return _dataset("hellaswag", records)


def load_winogrande(data_dir: Any = None, **_: Any):
    """`sentence`, `option1`, `option2`, `answer` ("1"/"2"), as allenai/winogrande."""
    rows = _jsonl(task_file("winogrande", data_dir))
    return _dataset("winogrande", [{k: str(r[k]) for k in ("sentence", "option1", "option2", "answer")} for r in rows])


def _arc_like(task: str, data_dir: Any, question_field: str):
    rows = _jsonl(task_file(task, data_dir))
    return _dataset(task, [{
        "id": r["id"],
        question_field: r["question"]["stem"],
        "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                    "label": [c["label"] for c in r["question"]["choices"]]},
        "answerKey": r["answerKey"],
    } for r in rows])


def load_arc_easy(data_dir: Any = None, **_: Any):
    """ARC jsonl -> `question`, `choices.text`, `choices.label`, `answerKey` (allenai/ai2_arc fields)."""
    return _arc_like("arc_easy", data_dir, "question")


def load_arc_challenge(data_dir: Any = None, **_: Any):
    return _arc_like("arc_challenge", data_dir, "question")


def load_openbookqa(data_dir: Any = None, **_: Any):
    """OpenBookQA jsonl -> `question_stem`, `choices`, `answerKey` (allenai/openbookqa fields)."""
    return _arc_like("openbookqa", data_dir, "question_stem")


# lm-eval's winogrande prompt functions (tasks/winogrande/preprocess_winogrande.py)
def winogrande_doc_to_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
