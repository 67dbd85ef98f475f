"""Zero-shot accuracy through lm-eval (the pruning papers' second metric), on lm-eval's own tasks or on local copies."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from ..errors import InputError

logger = logging.getLogger(__name__)

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_PREFIX = "d2prune_"
# the metric each task is reported with in the paper tables (acc_norm where lm-eval length-normalizes)
PAPER_METRIC = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


#: the Hub dataset (path, config) of each paper task, as lm-eval's own task YAMLs name them (other tasks are looked
#: up in lm-eval's task index)
HUB_DATASETS = {
    "boolq": ("aps/super_glue", "boolq"), "rte": ("nyu-mll/glue", "rte"), "hellaswag": ("Rowan/hellaswag", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"), "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"), "openbookqa": ("allenai/openbookqa", "main"),
}
INSTALL_HINT = 'pip install "optimum-d2prune[zeroshot]"'


def is_lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _require_lm_eval() -> None:
    if not is_lm_eval_available():
        raise ImportError(f"Zero-shot evaluation needs lm-eval, which is not installed: `{INSTALL_HINT}` (or "
                          "`pip install lm-eval`).")


def check_tasks(tasks: list[str], data_dir: Optional[Union[str, os.PathLike]] = None) -> None:
    """Raise before any work if lm-eval is missing or a task's data cannot be had.

    With `data_dir`, each task's local file must be there. Without it, lm-eval downloads each task's dataset from
    the Hub: when the Hub cannot be reached, each must already be in the Hugging Face datasets cache, which is
    checked without network; the tasks that are not are named, with how to provide them.
    """
    _require_lm_eval()
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise InputError(f"`tasks` must be a non-empty list of task names, got {tasks!r}.")
    if data_dir is None:
        _check_hub_tasks(tasks)
        return
    from .tasks.local_data import FILES

    unknown = [t for t in tasks if t not in FILES]
    if unknown:
        raise InputError(f"Tasks {unknown} have no local loader; with `data_dir` the tasks are {list(FILES)}.")
    missing = {t: str(Path(data_dir) / FILES[t][0]) for t in tasks if not (Path(data_dir) / FILES[t][0]).is_file()}
    if missing:
        raise FileNotFoundError(f"Missing zero-shot data for tasks {', '.join(missing)}: {list(missing.values())}. "
                                "Lay out `data_dir` as docs/hub.md describes (one subfolder per task), or drop `data_dir` "
                                "to use lm-eval's tasks.")


def _check_hub_tasks(tasks: list[str]) -> None:
    """Offline, every task's Hub dataset must be cached already (lm-eval would otherwise retry, then fail)."""
    from ..io.hub import hub_offline_reason

    offline = hub_offline_reason()
    if offline is None:
        return
    datasets = _task_datasets(tasks)
    missing = [t for t in tasks if datasets.get(t) is None or not all(_is_cached(*d) for d in datasets[t])]
    if missing:
        raise InputError(f"Zero-shot tasks {', '.join(missing)} need their datasets from the Hugging Face Hub, which "
                         f"cannot be reached ({offline}), and they are not in the local cache. Pass --zero-shot-data "
                         "DIR (`data_dir`) with local copies of the paper tasks (one subfolder per task, "
                         "as docs/hub.md describes), or run once with network to fill the cache.")


def _task_datasets(tasks: list[str]) -> dict[str, Optional[list[tuple[str, Optional[str]]]]]:
    """task -> its Hub datasets `[(path, config)]` (a group: its tasks'), None when lm-eval does not know it."""
    found: dict[str, Optional[list[tuple[str, Optional[str]]]]] = {
        t: [HUB_DATASETS[t]] for t in tasks if t in HUB_DATASETS}
    others = [t for t in tasks if t not in HUB_DATASETS]
    if not others:
        return found
    from lm_eval.tasks import TaskManager

    index = TaskManager().task_index

    def collect(name: str, depth: int = 0) -> Optional[list[tuple[str, Optional[str]]]]:
        entry = index.get(name)
        config = (entry.cfg or {}) if entry is not None else None
        if config is None or depth > 8:
            return None
        if config.get("dataset_path"):
            return [(config["dataset_path"], config.get("dataset_name"))]
        members = config.get("task") if "group" in config else None
        if not isinstance(members, list):
            return None
        parts = [collect(m, depth + 1) if isinstance(m, str) else None for m in members]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]

    found.update({t: collect(t) for t in others})
    return found


def _is_cached(path: str, name: Optional[str]) -> bool:
    """Whether `datasets` can load `path`/`name` offline: its processed copy is in the datasets cache (where
    `load_dataset` looks when the Hub is offline)."""
    import datasets

    try:
        from datasets.packaged_modules.cache.cache import _find_hash_in_cache

        _find_hash_in_cache(path, name, None, {}, None)
        return True
    except (ImportError, ValueError, OSError, KeyError):
        pass
    root = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(path.split("/"))
    return any(p.is_dir() for p in root.glob(f"{name or '*'}/*/*"))


@dataclass
class ZeroShotResults:
    """Per-task metrics as lm-eval reports them, the metric each task is ranked by, and their mean."""

    metrics: dict[str, dict[str, float]]  # task -> {"acc": ..., "acc_stderr": ..., "acc_norm": ...}
    samples: dict[str, int] = field(default_factory=dict)  # task -> examples evaluated
    limit: Optional[int] = None
    local: bool = False

    def metric_of(self, task: str) -> str:
        """`acc_norm` for HellaSwag, ARC-c and OpenBookQA (when reported), `acc` otherwise."""
        name = PAPER_METRIC.get(task, "acc")
        return name if name in self.metrics[task] else "acc"

    def scores(self) -> dict[str, float]:
        return {t: self.metrics[t][self.metric_of(t)] for t in self.metrics}

    @property
    def mean(self) -> float:
        scores = list(self.scores().values())
        return sum(scores) / len(scores) if scores else math.nan

    def stderrs(self) -> dict[str, float]:
        """lm-eval's standard error of each task's reported metric (NaN where it was not computed)."""
        return {t: self.metrics[t].get(f"{self.metric_of(t)}_stderr", math.nan) for t in self.metrics}

    @property
    def mean_stderr(self) -> float:
        """Standard error of the task mean, the tasks' examples being independent: `sqrt(sum se²) / tasks`."""
        errors = list(self.stderrs().values())
        return math.sqrt(sum(e * e for e in errors)) / len(errors) if errors else math.nan

    def table(self) -> str:
        """A markdown table: one row per task (acc, acc_norm, the reported metric, n) and the mean."""
        lines = ["| task | acc | acc_norm | reported ± stderr | n |", "|---|---:|---:|---:|---:|"]
        errors = self.stderrs()
        for task, m in self.metrics.items():
            norm = f"{m['acc_norm']:.4f}" if "acc_norm" in m else "-"
            lines.append(f"| {task} | {m['acc']:.4f} | {norm} | {self.scores()[task]:.4f}{_pm(errors[task])} "
                         f"({self.metric_of(task)}) | {self.samples.get(task, '')} |")
        lines.append(f"| **mean** | | | **{self.mean:.4f}**{_pm(self.mean_stderr)} | |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "scores": self.scores(), "mean": self.mean, "stderrs": self.stderrs(),
                "mean_stderr": self.mean_stderr, "samples": self.samples,
                "limit": self.limit, "local": self.local}


def _pm(error: float) -> str:
    return "" if math.isnan(error) else f" ± {error:.4f}"


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: Optional[list[str]] = None,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    limit: Optional[int] = None,
    batch_size: int = 8,
    device: Optional[str] = None,
    bootstrap_iters: int = 1000,
) -> ZeroShotResults:
    """Zero-shot accuracy of `model` with lm-eval (`simple_evaluate` on `HFLM(pretrained=model, tokenizer=...)`).

    Args:
        model: a transformers causal LM (pruned or not); evaluated where it is.
        tokenizer: its tokenizer.
        tasks: lm-eval task names; default the 7 of the pruning papers (`PAPER_TASKS`).
        data_dir: a folder with one subfolder per task (the layout docs/hub.md gives): the tasks then read those
            local files through the YAMLs shipped in `optimum_d2prune/evaluation/tasks/` (no download). Without
            it, lm-eval's own tasks are used (they download their datasets from the Hub).
        limit: evaluate only the first `limit` examples of each task (a quick estimate; say so when you report it).
        batch_size: lm-eval batch size.
        bootstrap_iters: passed to lm-eval; accuracies get their closed-form standard error (`acc_stderr`) whenever
            it is positive, only metrics such as F1 are bootstrapped. 0 skips every standard error.

    Returns:
        A `ZeroShotResults`; `print(results.table())` shows acc / acc_norm per task and the mean.

    Example:
    ```python
    >>> from optimum_d2prune.evaluation import zero_shot
    >>> results = zero_shot(model, tokenizer, data_dir="zeroshot/", limit=200)
    >>> print(results.table())
    ```
    """
    tasks = list(PAPER_TASKS if tasks is None else tasks)
    check_tasks(tasks, data_dir)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InputError(f"`limit` must be a positive integer or None, got {limit!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if device is None:
        device = str(model.get_input_embeddings().weight.device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    if data_dir is not None:
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                              metadata={"data_dir": str(Path(data_dir).resolve())})
        names = [LOCAL_PREFIX + t for t in tasks]
    else:
        manager, names = TaskManager(), tasks
    was_training = model.training
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=0, log_samples=False,
            # lm-eval reseeds the global RNGs unless told not to; zero-shot scoring needs no randomness
            random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            bootstrap_iters=bootstrap_iters,
        )
    finally:
        model.train(was_training)
    metrics: dict[str, dict[str, float]] = {}
    samples: dict[str, int] = {}
    for task, name in zip(tasks, names):
        raw = out["results"][name]
        metrics[task] = {k.split(",")[0] + ("_stderr" if "_stderr" in k else ""): float(v) for k, v in raw.items()
                         if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics[task] = {k.replace("_stderr_stderr", "_stderr"): v for k, v in metrics[task].items()}
        n = out.get("n-samples", {}).get(name, {})
        samples[task] = int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else 0
    results = ZeroShotResults(metrics, samples, limit, data_dir is not None)
    logger.info("Zero-shot (%s%s):\n%s", "local data" if data_dir is not None else "lm-eval tasks",
                f", first {limit} examples per task" if limit else "", results.table())
    return results
