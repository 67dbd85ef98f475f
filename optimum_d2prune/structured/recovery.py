"""Recovery: a short distillation of a pruned model (student) from its dense original (teacher).

Loss per step: `kl_weight · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))` over the predicted positions (padding left
out) plus `hidden_weight · mean_l ‖h_s,l − h_t,π(l)‖² / ‖h_t,π(l)‖²` over the block outputs, student block l matched
to teacher block π(l) (`layer_map`: the kept blocks of a blocks-mode shrink, the identity otherwise). AdamW, a fixed
step budget, batches taken in order (cyclically), so a resumed run sees the same data as an uninterrupted one.

- `keep_masks=True` (for unstructured / N:M models): every weight that is exactly zero before training is zeroed
  again after each step (and gets no gradient), so the sparsity pattern is kept.
- `output_dir`: the student's weights, the optimizer and the step are saved there every `save_every` steps (one
  `recovery_state.pt`, replaced atomically); a run started with the same folder resumes from it. A state that does
  not match the student (other parameter names or shapes) is refused, never overwritten.
- Both models run in eval mode (no dropout): the student only differs from its inference self by its gradients.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration.hooks import HookManager
from ..errors import CheckpointError, ConfigError
from .calibration import _to, as_batches, block_output, model_device
from .plan import blocks_of

logger = logging.getLogger(__name__)

STATE_NAME = "recovery_state.pt"


@dataclass
class RecoveryConfig:
    """Settings of the recovery distillation."""

    steps: int = field(default=100, metadata={"help": "Optimizer steps (the budget)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (constant after warmup)."})
    warmup_steps: int = field(default=0, metadata={"help": "Steps of linear learning-rate warmup."})
    batch_size: int = field(default=1, metadata={"help": "Calibration batches per step (gradients accumulated)."})
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of the logit KL term."})
    hidden_weight: float = field(default=1.0, metadata={"help": "Weight of the normalised hidden-state MSE term."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL term."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    keep_masks: bool = field(default=False, metadata={"help": "Keep every zero weight at zero (unstructured / N:M "
                                                              "models: the sparsity pattern survives training)."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for the resumable state (None: "
                                                                      "no state saved)."})
    save_every: int = field(default=25, metadata={"help": "Save the state every this many steps (and at the end)."})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"`warmup_steps` must be a non-negative integer, got {self.warmup_steps!r}.")
        for name in ("learning_rate", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"`{name}` must be a positive number, got {value!r}.")
        for name in ("kl_weight", "hidden_weight", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"`{name}` must be a number >= 0, got {value!r}.")
        if self.kl_weight == 0 and self.hidden_weight == 0:
            raise ConfigError("`kl_weight` and `hidden_weight` are both 0: there is nothing to train on.")


@dataclass
class RecoveryReport:
    """What a recovery run did."""

    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)  # per step, this run's and the resumed run's
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fingerprint(student: nn.Module, config: RecoveryConfig) -> str:
    h = hashlib.sha256()
    for name, p in student.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    relevant = {k: v for k, v in asdict(config).items() if k not in ("steps", "output_dir", "save_every")}
    h.update(repr(sorted(relevant.items())).encode())
    return h.hexdigest()


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{name: weight == 0}` of every matrix holding zeros (the sparsity pattern to keep)."""
    return {n: p.detach() == 0 for n, p in model.named_parameters() if p.dim() >= 2 and bool((p == 0).any())}


class _BlockOutputs:
    """Forward hooks that keep every block's output of the last forward."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.outputs: list[Optional[torch.Tensor]] = [None] * len(blocks)
        self.hooks = HookManager()
        for i, block in enumerate(blocks):
            self.hooks.add(block.register_forward_hook(self._hook(i)))

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.outputs[index] = block_output(output)
        return hook

    def remove(self) -> None:
        self.hooks.remove()


def _kl(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor],
        temperature: float) -> torch.Tensor:
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per = (t.exp() * (t - s)).sum(-1)
    if mask is not None and per.dim() == 2:
        m = mask.to(per.dtype)
        return (per * m).sum() / m.sum().clamp_min(1) * temperature**2
    return per.mean() * temperature**2


def _hidden_mse(student: list, teacher: list, layer_map: list[int], mask: Optional[torch.Tensor]) -> torch.Tensor:
    terms = []
    for s_index, t_index in enumerate(layer_map):
        s, t = student[s_index].float(), teacher[t_index].float()
        err, ref = (s - t).square().sum(-1), t.square().sum(-1)
        if mask is not None and err.dim() == 2:
            err, ref = err * mask, ref * mask
        terms.append(err.sum() / ref.sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def distill(student: nn.Module, teacher: nn.Module, batches: Any, config: RecoveryConfig,
            layer_map: Optional[list[int]] = None) -> RecoveryReport:
    """Train `student` in place towards `teacher` on `batches` (see the module docstring).

    Args:
        student: the pruned/shrunk model (its parameters are trained).
        teacher: the dense model (not changed).
        batches: calibration or user batches (`{"input_ids", "attention_mask"}` dicts or token tensors).
        config: a `RecoveryConfig`.
        layer_map: teacher block of each student block (`ShrinkReport.kept_blocks`); default the identity.
    """
    if not isinstance(config, RecoveryConfig):
        raise ConfigError(f"`config` must be a RecoveryConfig, got {type(config).__name__}.")
    data = as_batches(batches)
    _, s_blocks = blocks_of(student)
    _, t_blocks = blocks_of(teacher)
    layer_map = list(range(len(s_blocks))) if layer_map is None else list(layer_map)
    if len(layer_map) != len(s_blocks) or any(not 0 <= i < len(t_blocks) for i in layer_map):
        raise ConfigError(f"`layer_map` must give a teacher block (0..{len(t_blocks) - 1}) for each of the student's "
                          f"{len(s_blocks)} blocks, got {layer_map}. Pass `ShrinkReport.kept_blocks`.")
    if config.hidden_weight and layer_map == list(range(len(s_blocks))) and len(s_blocks) != len(t_blocks):
        raise ConfigError("The student has fewer blocks than the teacher: pass `layer_map=report.kept_blocks`.")
    state_path = Path(config.output_dir).expanduser() / STATE_NAME if config.output_dir else None
    fingerprint = _fingerprint(student, config)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    masks = zero_masks(student) if config.keep_masks else {}
    start, losses = 0, []
    if state_path is not None and state_path.is_file():
        start, losses = _load_state(state_path, fingerprint, student, optimizer)
        if config.keep_masks:
            masks = _load_masks(state_path) or masks
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    device = model_device(student)
    dtype = next((p.dtype for p in student.parameters() if p.is_floating_point()), torch.float32)
    named = dict(student.named_parameters())
    masks = {name: m.to(named[name].device) for name, m in masks.items()}
    started = time.perf_counter()
    s_hooks, t_hooks = _BlockOutputs(s_blocks), _BlockOutputs(t_blocks)
    training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        bar = tqdm(range(start, config.steps), desc="recovery", unit="step", initial=start, total=config.steps)
        for step in bar:
            _set_lr(optimizer, config, step)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for j in range(config.batch_size):
                batch = _to(data[(step * config.batch_size + j) % len(data)], device, dtype)
                mask = batch.get("attention_mask")
                mask = None if mask is None else mask.bool()
                with torch.no_grad():
                    t_logits = teacher(**batch).logits
                s_logits = student(**batch).logits
                loss = s_logits.new_zeros((), dtype=torch.float32)
                if config.kl_weight:
                    loss = loss + config.kl_weight * _kl(s_logits, t_logits, mask, config.temperature)
                if config.hidden_weight:
                    loss = loss + config.hidden_weight * _hidden_mse(s_hooks.outputs, t_hooks.outputs, layer_map,
                                                                     None if mask is None else mask.float())
                (loss / config.batch_size).backward()
                total += float(loss.detach()) / config.batch_size
            for name, m in masks.items():
                grad = named[name].grad
                if grad is not None:
                    grad.masked_fill_(m, 0)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                for name, m in masks.items():
                    named[name].masked_fill_(m, 0)
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}")
            done = step + 1
            if state_path is not None and (done % config.save_every == 0 or done == config.steps):
                _save_state(state_path, fingerprint, done, student, optimizer, losses, masks)
    finally:
        s_hooks.remove()
        t_hooks.remove()
        student.train(training[0])
        teacher.train(training[1])
    report = RecoveryReport(config.steps, start, losses, time.perf_counter() - started)
    logger.info("Recovery: %d steps (from %d), loss %.4f -> %.4f.", config.steps, start,
                losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    return report


def _set_lr(optimizer: torch.optim.Optimizer, config: RecoveryConfig, step: int) -> None:
    scale = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * scale


def _save_state(path: Path, fingerprint: str, step: int, student: nn.Module, optimizer: torch.optim.Optimizer,
                losses: list[float], masks: dict[str, torch.Tensor]) -> None:
    """Write the state to a temporary file and move it over the previous one (never a half-written state)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"fingerprint": fingerprint, "step": step, "model": student.state_dict(),
                "optimizer": optimizer.state_dict(), "losses": losses,
                "masks": {k: v.cpu() for k, v in masks.items()}}, tmp)
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable file is refused, whatever the reason
        raise CheckpointError(f"Could not read the recovery state {path} ({type(err).__name__}: {err}). Remove it or "
                              "choose another `output_dir`.") from err


def _load_state(path: Path, fingerprint: str, student: nn.Module,
                optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
    state = _read(path)
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path} holds the state of another recovery run (another model or settings); it is "
                              "not overwritten. Choose another `output_dir`, or remove that file to start over.")
    student.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("Recovery resumed at step %d from %s.", state["step"], path)
    return int(state["step"]), list(state["losses"])


def _load_masks(path: Path) -> dict[str, torch.Tensor]:
    return dict(_read(path).get("masks") or {})
