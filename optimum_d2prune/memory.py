"""Peak memory of a code region: CUDA allocator peak on GPU, sampled resident set size on CPU."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional, Protocol, Union

import torch

from .solvers.obs import ROW_CHUNK_ELEMENTS, SWEEP_SUB_BLOCK, SWEEP_SYSTEM_ELEMENTS

if TYPE_CHECKING:
    from .configuration import D2PruneConfig

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_host_memory() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Tensors below glibc's mmap threshold (32 MiB at most) live on the heap, which keeps freed pages: without this,
    the memory of one phase's temporaries stays resident through the next ones.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def current_rss() -> int:
    """Resident set size of this process in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class TensorCounter(Protocol):
    """A counter of live tensor bytes (`optimum_d2prune.testing.memory_counter.LiveTensorBytes`)."""

    live: int
    peak: int


class PeakMemory:
    """Context manager measuring the peak memory of a region.

    On CUDA devices: `torch.cuda.max_memory_allocated` (reset on entry). On CPU: the process RSS sampled every
    `interval` seconds by a background thread; `peak_bytes` is the absolute peak and `increase_bytes` the peak
    minus the RSS on entry (what the region added on top of what was already loaded). With `counter` (an active
    live-tensor counter, CPU): the bytes of live tensors instead, exact where the sampled RSS can miss a short peak
    or keep freed heap pages (the CPU analogue of the CUDA allocator's statistics; slower: every op is seen).
    """

    def __init__(self, device: Optional[torch.device] = None, interval: float = 0.005,
                 counter: Optional[TensorCounter] = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval = interval
        self.counter = counter if self.device.type != "cuda" else None
        self.start_bytes = 0
        self.peak_bytes = 0
        #: peak of each phase marked with `phase(name)`, measured like `peak_bytes` (absolute)
        self.phase_peaks: dict[str, int] = {}
        self._active: list[str] = []  # the phases entered and not yet left
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def kind(self) -> str:
        if self.counter is not None:
            return "live tensors"
        return "cuda allocated" if self.device.type == "cuda" else "process RSS"

    @property
    def increase_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._record(current_rss())

    def _record(self, value: int) -> None:
        self.peak_bytes = max(self.peak_bytes, value)
        for phase in self._active:
            self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), value)

    def _fold_cuda_peak(self) -> None:
        """Credit the allocator's peak since the last reset to every active phase, then reset it."""
        torch.cuda.synchronize(self.device)
        self._record(torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)

    def _fold(self) -> None:
        """Credit the peak since the last fold (allocator or counter) to the active phases, or the RSS now."""
        if self.device.type == "cuda":
            self._fold_cuda_peak()
        elif self.counter is not None:
            self._record(self.counter.peak)
            self.counter.peak = self.counter.live
        else:
            self._record(current_rss())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the peak inside this region to `name` as well (phases nest; one name accumulates its max).

        On the CPU, memory freed in the phase is handed back to the OS at its end (`release_host_memory`), so the
        next phase's RSS is not inflated by what the allocator kept.
        """
        self._fold()
        self._active.append(name)
        try:
            yield
        finally:
            self._fold()
            self._active.remove(name)
            if self.device.type != "cuda" and self.counter is None:
                release_host_memory()

    def phase_increases(self) -> dict[str, int]:
        """Each phase's peak minus the memory at entry of the measured region."""
        return {name: max(0, peak - self.start_bytes) for name, peak in self.phase_peaks.items()}

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        elif self.counter is not None:
            self.counter.peak = self.start_bytes = self.peak_bytes = self.counter.live
        else:
            self.start_bytes = self.peak_bytes = current_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        elif self.counter is not None:
            self._fold()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, current_rss())


# ---------------------------------------------------------------------------------------------- the memory model
PHASES = ("inputs", "statistics", "attention choice", "solve", "propagate")
_F32 = 4


@dataclass
class MemoryEstimate:
    """Estimated peak bytes of each phase of a pruning run, above what was in use before it started (on CPU the
    loaded model; on an accelerator nothing: `resident` is the model part that lives there during the run)."""

    phases: dict[str, int]
    resident: int
    components: dict[str, int]

    @property
    def peak(self) -> int:
        return self.resident + max(self.phases.values())

    def table(self) -> str:
        rows = [f"| {name} | {value / 2**30:.2f} |" for name, value in self.phases.items()]
        return "\n".join(["| phase | GiB |", "|---|---:|", *rows, f"| peak incl. resident weights | "
                          f"{self.peak / 2**30:.2f} |"])


def _shape(model_config: Any) -> dict[str, int]:
    """Hidden, intermediate and head sizes of a decoder config (text config of multimodal ones)."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
    expert_size = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", 4 * hidden)
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "num_experts_per_token", None) or 1
    return {"hidden": hidden, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "experts": experts, "expert_size": expert_size, "top_k": top_k if experts else 0,
            "layers": config.num_hidden_layers, "vocab": getattr(config, "vocab_size", 0)}


def estimate(
    model_config: Any,
    config: "D2PruneConfig",
    num_samples: int,
    seq_len: int,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    model_on_device: Optional[bool] = None,
) -> MemoryEstimate:
    """Peak memory of each phase of pruning a LLaMA-style decoder (attention q/k/v/o, gated MLP or MoE experts).

    The terms follow the engine: calibration activations `N·T·d` (model dtype; on the CPU with
    `offload_activations`; twice with `reconstruction_reference="model"`), the statistics of one block (fp32
    `cols²` sums of each input stream: q/k/v, o (`heads·head_dim` columns), gate/up, down), one Hessian factor
    (`cols²`, the sum becomes the damped H in place),
    the solve's working copies (`rows·cols` fp32 and bool), one batch's forward through a block, and for
    D²Prune's KL term the copied sequences, four sets of per-head queries/keys and a few `kl_chunk_mib` chunks.
    MoE blocks (routed experts, no shared expert): the experts' inputs and routing are kept for the block (the
    statistics of one expert at a time are built from them), and the forward holds `top_k` copies of each token's
    hidden state (transformers' grouped experts path; the eager loop holds less).
    `model_on_device`: whether the model already lives on `device` (default: True on CPU, False elsewhere; then one
    block and the weights outside the blocks are counted as `resident`).
    """
    device = torch.device(device)
    s = _shape(model_config)
    d, inter, hd = s["hidden"], s["intermediate"], s["head_dim"]
    q_rows, kv_rows = s["heads"] * hd, s["kv_heads"] * hd
    act = torch.tensor([], dtype=dtype).element_size()
    tokens, batch_tokens = num_samples * seq_len, batch_size * seq_len
    moe = bool(s["experts"])
    mlp = s["expert_size"] if moe else inter
    block_params = d * (q_rows + 2 * kv_rows) + q_rows * d + 3 * d * mlp * max(s["experts"], 1)
    outside = 2 * s["vocab"] * d
    on_device = device.type == "cpu" if model_on_device is None else model_on_device
    resident = 0 if on_device else (block_params + outside) * act
    offloaded = config.offload_activations and device.type != "cpu"
    activations = 2 * batch_tokens * d * act if offloaded else tokens * d * act  # offloaded: one batch in and out
    # `reconstruction_reference="model"`: the dense model's activations, kept beside them from the first block on
    two_streams = bool(config.block_reconstruction) and config.reconstruction_reference == "model"
    reference = tokens * d * act if two_streams and not offloaded else 0
    # one batch through a block at its peak, the MLP: the residual, the normed input, the output; dense: act(gate), up
    # and their product; MoE: the grouped path's four `[tokens·top_k, d]` tensors (the gathered inputs, the
    # experts' outputs, weighted, and reordered)
    if moe:
        forward = 3 * batch_tokens * d * act + 4 * batch_tokens * s["top_k"] * d * act
    else:
        forward = 3 * batch_tokens * d * act + 3 * batch_tokens * inter * max(act, _F32)
    hook = batch_tokens * max(q_rows, d if moe else inter) * _F32  # y² of the widest hooked output
    qkv_sum, o_sum = d * d * _F32, q_rows * q_rows * _F32
    mlp_sums = 0 if moe else (d * d + inter * inter) * _F32  # experts: built one at a time in the solve
    sums = qkv_sum + o_sum + mlp_sums
    # MoE: the experts module's inputs and routing indices of every calibration token, kept for the block
    expert_inputs = tokens * (d * act + s["top_k"] * 8) if moe else 0
    uses_kl = config.uses_attention_awareness and config.attention_update == "dynamic" and config.kl_weight > 0
    kl_inputs = min(config.kl_num_samples, num_samples) * seq_len * (d + 2 * hd) * _F32 if uses_kl else 0
    # block reconstruction: a copy of the block's dense weights, and the two output projections' dense outputs
    # recorded in the statistics pass (kept where the activations are; swapped weights instead with `sequential`)
    rebuild = bool(config.block_reconstruction)
    dense_copy = block_params * act if rebuild else 0
    recorded = 0
    if rebuild and not config.sequential and not offloaded:
        recorded = 2 * tokens * d * act
    stats = activations + reference + sums + expert_inputs + kl_inputs + forward + hook + dense_copy + recorded

    def solve_work(rows: int, cols: int) -> int:
        return solve_work_bytes(rows, cols, config.resolve_refine_steps() > 0, config.admm_steps > 0)

    qkv = (q_rows + 2 * kv_rows) * d
    candidates = 2 * qkv * (_F32 + 1) if config.uses_attention_awareness else 0
    chunk = config.kl_chunk_mib * 2**20
    query_rows = seq_len if config.kl_query_rows is None else min(seq_len, config.kl_query_rows)
    per_head = query_rows * seq_len * _F32
    heads_chunk = max(1, chunk // per_head)
    group = max(1, s["heads"] // s["kv_heads"])
    heads_chunk = max(group, heads_chunk // group * group)
    # per sequence: the queries/keys of the reference and the three candidates, then either the probability chunks
    # or, while a candidate's queries are built, that projection's output with its norm / position-encoding
    # temporaries and the original q/k/v rows saved while the candidate's are swapped in
    capture = 4 * seq_len * q_rows * _F32 + qkv * _F32
    kl = (4 * seq_len * (q_rows + kv_rows) * _F32 + max(6 * min(heads_chunk, s["heads"]) * per_head, capture)
          if uses_kl else 0)
    held = activations + reference + expert_inputs + dense_copy + recorded  # alive through a block's solve
    attention = held + sums + kl_inputs + qkv_sum + candidates + max(kl, solve_work(q_rows, d))
    if not config.uses_attention_awareness:
        attention = 0
    solve = max(attention, held + max(  # the solve phase holds the attention choice
        sums + qkv_sum + solve_work(q_rows, d),  # q/k/v: every sum of the block, the q/k/v factor
        sums - qkv_sum + o_sum + solve_work(d, q_rows),  # o: its sum (the damped H) and its factor
        (d * d + mlp * mlp) * _F32 + d * d * _F32 + solve_work(2 * mlp if moe else mlp, d),  # gate/up (one expert's)
        mlp * mlp * _F32 * 2 + solve_work(d, mlp),  # down: its sum (the damped H) and its factor
    ))
    propagate = activations + reference + forward + batch_tokens * d * act
    # the down projection's refit (always some steps, never a sweep; ADMM first when `admm_steps`): its fp32 sums
    # (`cols²` and `rows·cols`) and the working copies
    refit_work = solve_work_bytes(d, inter, refit=True, admm=config.admm_steps > 0, sweep=False)
    reconstruction = held + forward + (inter * inter + d * inter) * _F32 + refit_work if rebuild else 0
    phases = {"inputs": activations + batch_tokens * d * act, "statistics": stats, "attention choice": attention,
              "solve": solve, "reconstruction": reconstruction, "propagate": propagate}
    components = {"activations": activations + reference, "statistics sums": sums,
                  "block forward (one batch)": forward + hook,
                  "expert inputs": expert_inputs, "KL inputs": kl_inputs, "KL chunk": kl,
                  "q/k/v candidates": candidates, "largest factor": max(mlp, q_rows, d) ** 2 * _F32,
                  "reconstruction targets": dense_copy + recorded,
                  "resident weights": resident}
    return MemoryEstimate({k: v for k, v in phases.items() if v}, resident, components)


def solve_work_bytes(rows: int, cols: int, refit: bool, admm: bool, sweep: bool = True) -> int:
    """Memory of one `[rows, cols]` layer solve beyond its statistics: weight copies (fp32 + bool mask) and the
    row-chunked temporaries (`ROW_CHUNK_ELEMENTS` rows at a time): about four `[chunk, cols]` fp32 matrices in the
    masking check; the refit's CG holds seven and writes into a new `[rows, cols]` result. ADMM (before the refit):
    the unit-diagonal H, its eigenvectors and the eigensolver's workspace (three `cols²`), and six whole
    `[rows, cols]` fp32 iterates and products. The sweep itself: a `[rows, sub, sub]` batched triangular system and
    its solution (at most `SWEEP_SYSTEM_ELEMENTS` entries per chunk of rows), which dominates for tall matrices with
    few columns; `sweep=False` for a refit alone (the block reconstruction)."""
    chunk = min(rows, max(1, ROW_CHUNK_ELEMENTS // cols)) * cols  # the rows of one `row_chunks` chunk
    temporaries = rows * cols * _F32 + 7 * chunk * _F32 if refit else 4 * chunk * _F32
    iterates = (3 * cols * cols + 6 * rows * cols) * _F32 + rows * cols if admm else 0
    system = 2 * min(rows * SWEEP_SUB_BLOCK**2, SWEEP_SYSTEM_ELEMENTS) * _F32 if sweep else 0
    return rows * cols * (2 * _F32 + 1) + max(system, temporaries, iterates)


class MemoryBudgetError(ValueError):
    """The estimated peak of a pruning run exceeds the memory available on its device."""


def available_bytes(device: Union[str, torch.device]) -> Optional[int]:
    """Free memory of an accelerator (`mem_get_info`), or the host's MemAvailable for the CPU; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(
    model_config: Any,
    config: "D2PruneConfig",
    num_samples: int,
    seq_len: int,
    device: Union[str, torch.device],
    model_bytes: int = 0,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
) -> MemoryEstimate:
    """The estimate of a run whose model (`model_bytes`, still elsewhere) is about to move to `device`; raises
    `MemoryBudgetError` with the estimate and what would make it fit when it exceeds the free memory."""
    device = torch.device(device)
    est = estimate(model_config, config, num_samples, seq_len, device, batch_size, dtype, model_on_device=True)
    moving = model_bytes if device.type != "cpu" else 0
    need = moving + est.peak
    free = available_bytes(device)
    if free is None or need <= free:
        return est
    hints = []
    samples = num_samples
    while samples > 1:
        samples //= 2
        smaller = estimate(model_config, config, samples, seq_len, device, batch_size, dtype, model_on_device=True)
        if moving + smaller.peak <= free:
            hints.append(f"--num-samples {samples} (estimated {(moving + smaller.peak) / 2**30:.1f} GiB)")
            break
    if device.type != "cpu" and not config.offload_activations:
        offloaded = estimate(model_config, config.replace(offload_activations=True), num_samples, seq_len, device,
                             batch_size, dtype, model_on_device=True)
        hints.append(f"--offload-activations (estimated {(moving + offloaded.peak) / 2**30:.1f} GiB)")
    if est.components.get("KL chunk", 0) and config.kl_chunk_mib > 16:
        hints.append(f"--kl-chunk-mib {max(1, config.kl_chunk_mib // 4)}")
    if moving:
        hints.append("a device with more memory, or --dtype bfloat16")
    raise MemoryBudgetError(
        f"This run needs about {need / 2**30:.1f} GiB on {device} ({moving / 2**30:.1f} GiB of weights + a "
        f"{est.peak / 2**30:.1f} GiB pruning peak) but {free / 2**30:.1f} GiB are free. Try: " + "; ".join(hints)
        + ". Estimate per phase:\n" + est.table()
    )
