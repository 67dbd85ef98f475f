"""One command-line run: load, calibrate, prune, save, evaluate, push. Under `torchrun` every rank prunes its share
of the calibration data; rank 0 alone holds the model's weights (the others hold it on the meta device and receive
each block in turn: `RuntimeOptions.weights_from_rank0`), evaluates, saves and pushes."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .checks import check_arguments, check_lengths, check_sources, plan_placement, resolve_sizes, run_device

logger = logging.getLogger(__name__)


class EvaluationFailedError(RuntimeError):
    """An evaluation failed after the pruned model was saved (the model is kept)."""

    def __init__(self, saved_to: Path, cause: BaseException) -> None:
        super().__init__(f"evaluation failed after pruning ({type(cause).__name__}: {cause}); the pruned model is "
                         f"saved and loadable at {saved_to}")
        self.saved_to = saved_to


@dataclass
class CliRun:
    """The state of one run, step by step."""

    args: argparse.Namespace
    argv: list[str]
    config: Any  # D2PruneConfig
    device: str
    rank: int = 0
    world_size: int = 1
    start: float = field(default_factory=time.perf_counter)
    source: Any = None
    tokenizer: Any = None
    model: Any = None
    sources: tuple = (None, None)  # (calibration, evaluation) DataSources
    eval_ids: Any = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    eval_name: str = ""
    report: Any = None
    out: Optional[Path] = None
    run_id: str = ""
    zero_shot: Any = None
    calibration_record: dict[str, Any] = field(default_factory=dict)

    @property
    def shrunk(self) -> bool:
        from ..structured.report import ShrinkReport

        return isinstance(self.report, ShrinkReport)

    @property
    def command(self) -> str:
        return "optimum-cli d2prune " + " ".join(shlex.quote(a) for a in self.argv)

    # ------------------------------------------------------------------------------------------- steps
    def load(self) -> None:
        """Resolve the model and tokenizer, check the data against the tokenizer, choose where the model lives,
        then load it (rank 0) or its skeleton (the other ranks)."""
        from transformers import AutoConfig

        from .. import models
        from ..calibration import estimate_parameters

        self.source = models.resolve_model_source(self.args.model, self.args.gguf_file)
        self.tokenizer = models.load_tokenizer(self.source)
        self.sources = check_sources(self.args, self.tokenizer)
        dtype = models.resolve_dtype(self.args.dtype, self.source, self.device)
        kwargs = {"gguf_file": self.source.gguf_file} if self.source.gguf_file else {}
        model_config = AutoConfig.from_pretrained(self.source.path, **kwargs)
        check_lengths(self.args, model_config)
        parameters = estimate_parameters(self.args.model, self.args.gguf_file)
        size = None if parameters is None else parameters * _itemsize(dtype)
        placement = plan_placement(self.args, model_config, size, self.config, self.device)
        runtime = {}
        if placement == "host" or self.world_size > 1:
            runtime["device"] = self.device  # blocks visit the device one at a time
        if self.world_size > 1:
            runtime["weights_from_rank0"] = True
        if runtime:
            self.config.runtime = dataclasses.replace(self.config.runtime, **runtime)
        if self.rank > 0:
            self.model = models.load_skeleton(self.source, dtype)
            return
        self.model, self.tokenizer = models.load_causal_lm(self.source, dtype=dtype, tokenizer=self.tokenizer)
        if placement == "device":
            self.model.to(self.device)
        logger.info("Loaded %s (%s, %s) on %s.", self.source, type(self.model).__name__, dtype,
                    self.device if placement == "device" else "the CPU (blocks pruned on " + self.device + ")")

    def evaluate_dense(self) -> None:
        from ..calibration import held_out_seed, self_generated_calibration

        if self.rank > 0 or self.args.eval == "none":
            return
        if self.args.eval == "self":
            self.eval_ids = self_generated_calibration(self.model, self.tokenizer, self.args.eval_samples,
                                                       self.args.eval_seq_len, seed=held_out_seed(self.args.seed),
                                                       desc="held-out text", chat=self.args.chat_template)
        if self.args.eval_dense:
            dense = self._perplexity("dense")
            self.eval_name = _eval_name(self.args, dense)
            self.evaluation[self.eval_name] = {"dense": dense}

    def calibrate(self) -> list:
        """The calibration batches: made on rank 0 (self-generated text needs the weights) and given to every
        rank."""
        from ..calibration import get_calibration_dataset, self_generated_calibration
        from ..pipeline.distributed import broadcast_object

        batches = None
        if self.rank == 0:
            if self.args.calibration == "self":
                batches = self_generated_calibration(self.model, self.tokenizer, self.args.num_samples,
                                                     self.args.seq_len, seed=self.args.seed,
                                                     chat=self.args.chat_template)
            else:
                batches = get_calibration_dataset(self.sources[0], self.tokenizer, self.args.num_samples,
                                                  self.args.seq_len, seed=self.args.seed)
        return broadcast_object(batches) if self.world_size > 1 else batches

    def prune(self, batches: list) -> None:
        from ..pruner import D2Pruner

        pruner = D2Pruner(self.config)
        pruner.prune(self.model, batches)
        self.report = pruner.report

    def save(self) -> Path:
        from ..calibration import resolve_chat
        from ..io import new_run_id, save_pruned

        calibration = {**self.sources[0].to_record(), "num_samples": self.args.num_samples,
                       "seq_len": self.args.seq_len, "seed": self.args.seed}
        if self.args.calibration == "self":
            calibration["chat"] = resolve_chat(self.args.chat_template, self.tokenizer)
        self.calibration_record = calibration
        home = next(self.model.parameters()).device
        self.model.to("cpu")  # saved from host memory; weights keep their dtype
        if self.shrunk:  # a smaller dense model: its own record
            from ..structured.export import save_shrunk

            self.out = save_shrunk(self.model, self.args.output_dir, self.report, self.tokenizer,
                                   overwrite=self.args.overwrite, base_model=self.source.hub_id,
                                   evaluation=self.evaluation)
        else:
            self.run_id = new_run_id()  # the evaluation is recorded only into the folder this save made
            self.out = save_pruned(self.model, self.args.output_dir, self.config, self.report, self.tokenizer,
                                   overwrite=self.args.overwrite, base_model=self.source.hub_id,
                                   calibration=calibration, evaluation=self.evaluation, command=self.command,
                                   extra_files=self._report_files(), run_id=self.run_id)
        self.model.to(home)
        return self.out

    def evaluate_pruned(self) -> None:
        """Perplexity and zero-shot of the saved model; whatever fails, the model stays saved and says where."""
        from ..evaluation.zeroshot import zero_shot as run_zero_shot
        from ..io import record_evaluation
        from .checks import zero_shot_tasks

        try:
            if self.args.eval != "none":
                pruned = self._perplexity("pruned")
                self.eval_name = _eval_name(self.args, pruned)
                self.evaluation.setdefault(self.eval_name, {})["pruned"] = pruned
            tasks = zero_shot_tasks(self.args.zero_shot)
            if tasks:
                self.zero_shot = run_zero_shot(self.model, self.tokenizer, tasks, data_dir=self.args.zero_shot_data,
                                               limit=self.args.zero_shot_limit, batch_size=self.args.batch_size)
                for task, value in self.zero_shot.scores().items():
                    self.evaluation[f"{task} ({self.zero_shot.metric_of(task)})"] = {"pruned": value}
                self.evaluation["zero-shot mean"] = {"pruned": self.zero_shot.mean}
        except Exception as err:  # the model is saved: say where, whatever went wrong
            raise EvaluationFailedError(self.out, err) from err
        if self.evaluation and self.shrunk:
            from ..structured.export import record_shrunk_evaluation

            record_shrunk_evaluation(self.out, self.evaluation)
        elif self.evaluation:
            record_evaluation(self.out, self.evaluation, self._report_files(), run_id=self.run_id,
                              sizes=self._sizes())

    def push(self) -> Optional[str]:
        from ..io import push_to_hub

        return push_to_hub(self.out, self.args.push_to_hub, private=self.args.private) if self.args.push_to_hub \
            else None

    # ------------------------------------------------------------------------------------------- helpers
    def _perplexity(self, stage: str):
        from ..evaluation import perplexity

        if self.eval_ids is not None:
            return perplexity(self.model, self.tokenizer, self.eval_ids, desc=f"perplexity ({stage})")
        return perplexity(self.model, self.tokenizer, self.sources[1], self.args.eval_seq_len,
                          self.args.eval_max_windows, desc=f"perplexity ({stage})")

    def _sizes(self) -> dict[str, dict[str, int]]:
        """How much data each recorded metric rests on (report.html and the model card)."""
        sizes: dict[str, dict[str, int]] = {}
        scored = self.evaluation.get(self.eval_name, {})
        for value in scored.values():
            if getattr(value, "windows", None):
                sizes[self.eval_name] = {"windows": value.windows, "tokens": value.tokens}
        if self.zero_shot is not None:
            for task, count in self.zero_shot.samples.items():
                sizes[f"{task} ({self.zero_shot.metric_of(task)})"] = {"examples": int(count)}
        return sizes

    def _report_files(self) -> dict[str, Any]:
        """report.html: the run's tables and figures, the evaluation measured so far, calibration and command."""
        if not self.args.report:
            return {}
        from ..report.html import ReportDetails, render_report

        label = f"{self.config.method} {self.config.pattern}"
        details = ReportDetails(zero_shot=self.zero_shot, evaluation=self.evaluation, sizes=self._sizes(),
                                calibration=self.calibration_record, command=self.command)
        return render_report({label: self.report}, details, title=f"{Path(str(self.source)).name}: {label}")


def run_d2prune(args: argparse.Namespace, argv: Optional[list[str]] = None) -> Optional[Path]:
    """Load, calibrate, prune, save, evaluate (and push) as the arguments say; returns the output folder (None on
    the ranks other than 0 of a `torchrun` job, which only prune)."""
    from ..pipeline.distributed import process_group
    from .d2prune import summary_line, summary_table

    config = check_arguments(args)  # everything the user typed is checked before anything is loaded
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    run = CliRun(args, list(argv if argv is not None else sys.argv[1:]), config, run_device(config), rank, world_size)
    resolve_sizes(args, run.device)
    with process_group(run.device, world_size):
        run.load()
        run.evaluate_dense()
        run.prune(run.calibrate())
    if rank > 0:
        return None
    out = run.save()
    run.evaluate_pruned()
    url = run.push()
    print(summary_table(run.report, run.evaluation, out, url))
    print(summary_line(run.report, run.evaluation.get(run.eval_name), run.eval_name, out,
                       time.perf_counter() - run.start))
    return out


def _eval_name(args: argparse.Namespace, scored: Any = None) -> str:
    """The metric's name, with the windows scored once known (`scored`: a `Perplexity`)."""
    if args.eval == "self":
        return f"perplexity (held-out self-generated text, {args.eval_samples} x {args.eval_seq_len} tokens)"
    name = "WikiText-2 test" if args.eval == "wikitext2" else Path(args.eval).name
    windows = getattr(scored, "windows", None)
    size = f"{windows} x {args.eval_seq_len} tokens" if windows else f"{args.eval_seq_len}-token windows"
    return f"perplexity ({name}, {size})"


def _itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()
