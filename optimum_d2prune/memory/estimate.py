"""The memory model of a pruning run: the peak bytes of each phase, from the model's shapes and the run's settings,
checked against the free memory of the device before anything moves there (`check_fits`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from ..errors import ConfigError
from ..methods.solvers.obs import ROW_CHUNK_ELEMENTS, SWEEP_SUB_BLOCK, SWEEP_SYSTEM_ELEMENTS

if TYPE_CHECKING:
    from ..configuration import D2PruneConfig

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


@dataclass(frozen=True)
class RunShape:
    """What of a run's settings the memory model reads (derived once from the config)."""

    num_samples: int
    seq_len: int
    batch_size: int = 1
    offload_activations: bool = False
    two_streams: bool = False  # reconstruction against the dense model's output: its activations kept beside
    reconstruction: bool = False
    sequential: bool = False
    attention_aware: bool = False  # D²Prune's q/k/v candidates
    kl: bool = False  # the KL term of the dynamic choice
    kl_samples: int = 4
    kl_query_rows: Optional[int] = 64
    kl_chunk_mib: int = 64
    refit: bool = False
    admm: bool = False

    @classmethod
    def of(cls, config: "D2PruneConfig", num_samples: int, seq_len: int, batch_size: int = 1) -> "RunShape":
        options = config.method_options
        aware = bool(getattr(options, "attention_aware", False))
        return cls(num_samples, seq_len, batch_size, config.runtime.offload_activations,
                   config.reconstruction and config.reconstruction_options.reference == "model",
                   config.reconstruction, config.sequential, aware,
                   aware and getattr(options, "skip_update", "") == "dynamic" and getattr(options, "kl_weight", 0) > 0,
                   getattr(options, "kl_samples", 4), getattr(options, "kl_query_rows", None),
                   config.runtime.kl_chunk_mib, getattr(options, "refit_steps", 0) > 0,
                   getattr(options, "admm_steps", 0) > 0)


def estimate(model_config: Any, run: RunShape, device: Union[str, torch.device] = "cpu",
             dtype: torch.dtype = torch.float32, model_on_device: Optional[bool] = None) -> MemoryEstimate:
    """Peak memory of each phase of pruning a LLaMA-style decoder (attention q/k/v/o, gated MLP or MoE experts).

    The terms follow the engine: calibration activations `N·T·d` (model dtype; on the CPU with
    `offload_activations`; twice with the reconstruction's `reference="model"`), the statistics of one block (fp32
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
    num_samples, seq_len, batch_size = run.num_samples, run.seq_len, run.batch_size
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
    offloaded = run.offload_activations and device.type != "cpu"
    activations = 2 * batch_tokens * d * act if offloaded else tokens * d * act  # offloaded: one batch in and out
    # `reference="model"`: the dense model's activations, kept beside them from the first block on
    reference = tokens * d * act if run.two_streams and not offloaded else 0
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
    uses_kl = run.kl
    kl_inputs = min(run.kl_samples, num_samples) * seq_len * (d + 2 * hd) * _F32 if uses_kl else 0
    # block reconstruction: a copy of the block's dense weights, and the two output projections' dense outputs
    # recorded in the statistics pass (kept where the activations are; swapped weights instead with `sequential`)
    rebuild = run.reconstruction
    dense_copy = block_params * act if rebuild else 0
    recorded = 0
    if rebuild and not run.sequential and not offloaded:
        recorded = 2 * tokens * d * act
    stats = activations + reference + sums + expert_inputs + kl_inputs + forward + hook + dense_copy + recorded

    def solve_work(rows: int, cols: int) -> int:
        return solve_work_bytes(rows, cols, run.refit, run.admm)

    qkv = (q_rows + 2 * kv_rows) * d
    candidates = 2 * qkv * (_F32 + 1) if run.attention_aware else 0
    chunk = run.kl_chunk_mib * 2**20
    query_rows = seq_len if run.kl_query_rows is None else min(seq_len, run.kl_query_rows)
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
    if not run.attention_aware:
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
    refit_work = solve_work_bytes(d, inter, refit=True, admm=run.admm, sweep=False)
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


class MemoryBudgetError(ConfigError):
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


def check_fits(model_config: Any, run: RunShape, device: Union[str, torch.device], model_bytes: int = 0,
               dtype: torch.dtype = torch.float32) -> MemoryEstimate:
    """The estimate of a run whose model (`model_bytes`, still elsewhere) is about to move to `device`; raises
    `MemoryBudgetError` with the estimate and what would make it fit when it exceeds the free memory."""
    device = torch.device(device)
    est = estimate(model_config, run, device, dtype, model_on_device=True)
    moving = model_bytes if device.type != "cpu" else 0
    need = moving + est.peak
    free = available_bytes(device)
    if free is None or need <= free:
        return est
    hints = []
    samples = run.num_samples
    while samples > 1:
        samples //= 2
        smaller = estimate(model_config, replace(run, num_samples=samples), device, dtype, model_on_device=True)
        if moving + smaller.peak <= free:
            hints.append(f"--num-samples {samples} (estimated {(moving + smaller.peak) / 2**30:.1f} GiB)")
            break
    if device.type != "cpu" and not run.offload_activations:
        offloaded = estimate(model_config, replace(run, offload_activations=True), device, dtype, model_on_device=True)
        hints.append(f"--offload-activations (estimated {(moving + offloaded.peak) / 2**30:.1f} GiB)")
    if est.components.get("KL chunk", 0) and run.kl_chunk_mib > 16:
        hints.append(f"--kl-chunk-mib {max(1, run.kl_chunk_mib // 4)}")
    if moving:
        hints.append("a device with more memory, or --dtype bfloat16")
    raise MemoryBudgetError(
        f"This run needs about {need / 2**30:.1f} GiB on {device} ({moving / 2**30:.1f} GiB of weights + a "
        f"{est.peak / 2**30:.1f} GiB pruning peak) but {free / 2**30:.1f} GiB are free. Try: " + "; ".join(hints)
        + ". Estimate per phase:\n" + est.table()
    )
