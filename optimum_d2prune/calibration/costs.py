"""What generating text with the model costs (`--calibration self`, `--eval self`), estimated before it loads.

Generation is one forward step per token position for each batch of sequences, so a request such as
`--eval-samples 100000000` is a hundred-hour job that a typo can start. The CLI refuses, before anything loads, a
request above `MAX_GENERATED_TOKENS` tokens or `MAX_GENERATION_SECONDS` estimated seconds unless `--force` is given,
and says what it would cost.

The seconds are rough on purpose: a per-step cost from the parameter count, measured for one configuration each and
scaled linearly (CPU: SmolLM2-135M on 2 cores, 7.3 ms per generated token in batches of 16, which is compute-bound
and grows with the parameters; CUDA: about 20 ms of per-step overhead plus reading the weights once per step at
~2 TB/s). The parameter count comes from the model files without loading them (safetensors headers, GGUF tensor
infos); a Hub id is not looked up, and only the token cap applies to it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

from ..errors import InputError

MAX_GENERATED_TOKENS = 2**21  # 2,097,152: 8x the paper's 128 x 2048 calibration tokens
MAX_GENERATION_SECONDS = 2 * 3600
GENERATION_BATCH = 16  # what `self_generated_calibration` uses

_CPU_SECONDS_PER_PARAMETER_TOKEN = 5.4e-11
_CUDA_SECONDS_PER_STEP = 0.02
_CUDA_BYTES_PER_SECOND = 2e12
_BYTES_PER_PARAMETER = 2  # a 16-bit model on CUDA; on the CPU the cost counts operations, not bytes


@dataclass(frozen=True)
class GenerationJob:
    """One generation the run would do: `samples` sequences of `seq_len` tokens, and the flags that set them."""

    what: str  # e.g. "--calibration self"
    samples: int
    seq_len: int
    flags: str  # e.g. "--num-samples / --seq-len"

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len


def estimate_generation_seconds(job: GenerationJob, parameters: int, device: str) -> float:
    """Rough seconds to generate `job` with a model of `parameters` on `device` ("cpu", "cuda", "cuda:1"...)."""
    steps = math.ceil(job.samples / GENERATION_BATCH) * job.seq_len
    if device.startswith("cuda"):
        return steps * (_CUDA_SECONDS_PER_STEP + parameters * _BYTES_PER_PARAMETER / _CUDA_BYTES_PER_SECOND)
    return job.tokens * parameters * _CPU_SECONDS_PER_PARAMETER_TOKEN


def check_generation_cost(jobs: list[GenerationJob], device: str, parameters: Optional[int], force: bool) -> None:
    """Raise `InputError` when the jobs together exceed the token or (when `parameters` is known) time cap, naming
    the cost of each and `--force`; with `force`, return silently."""
    jobs = [job for job in jobs if job.samples and job.seq_len]
    tokens = sum(job.tokens for job in jobs)
    seconds = None if parameters is None else sum(estimate_generation_seconds(j, parameters, device) for j in jobs)
    if force or (tokens <= MAX_GENERATED_TOKENS and (seconds is None or seconds <= MAX_GENERATION_SECONDS)):
        return
    parts = []
    for job in jobs:
        cost = f"{job.samples:,} x {job.seq_len:,} = {job.tokens:,} tokens"
        if parameters is not None:
            cost += f", about {_duration(estimate_generation_seconds(job, parameters, device))}"
        parts.append(f"{job.what} would generate {cost}")
    model = f" with {parameters / 1e6:,.0f}M parameters on {device}" if parameters is not None else ""
    flags = " or ".join(job.flags for job in jobs)
    raise InputError(f"{'; '.join(parts)}{model}: above the cap of {MAX_GENERATED_TOKENS:,} tokens / "
                     f"{_duration(MAX_GENERATION_SECONDS)} of generation. Lower {flags}, or pass --force to start "
                     "anyway.")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"


def estimate_parameters(model: str, gguf_file: Optional[str] = None) -> Optional[int]:
    """Parameter count of a local model (folder of safetensors, or GGUF file), or the `smollm2` alias, read from the
    files' headers without loading weights; None for a Hub id or files it cannot read."""
    from ..models import SMOLLM2_ALIAS, smollm2_gguf_path

    try:
        if model.strip().lower() == SMOLLM2_ALIAS and not gguf_file:
            return _gguf_parameters(smollm2_gguf_path())
        path = Path(model).expanduser()
        if path.is_file():
            return _gguf_parameters(path) if path.suffix == ".gguf" else None
        if path.is_dir() and gguf_file:
            return _gguf_parameters(path / gguf_file)
        shards = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        return sum(_safetensors_parameters(p) for p in shards) or None
    except (OSError, ValueError, KeyError, struct.error):
        return None


def _safetensors_parameters(path: Path) -> int:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")


_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_parameters(path: Path) -> int:
    """Sum of the tensor sizes in a GGUF file's tensor infos (the key-value metadata before them is skipped)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _version, tensors, pairs = struct.unpack("<IQQ", f.read(20))
        for _ in range(pairs):
            _skip_string(f)
            _skip_value(f, struct.unpack("<I", f.read(4))[0])
        total = 0
        for _ in range(tensors):
            _skip_string(f)
            (dims,) = struct.unpack("<I", f.read(4))
            total += math.prod(struct.unpack(f"<{dims}Q", f.read(8 * dims)))
            f.seek(12, os.SEEK_CUR)  # type (uint32) and offset (uint64)
        return total


def _skip_string(f: BinaryIO) -> None:
    (length,) = struct.unpack("<Q", f.read(8))
    f.seek(length, os.SEEK_CUR)


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind == _GGUF_STRING:
        _skip_string(f)
    elif kind == _GGUF_ARRAY:
        item, count = struct.unpack("<IQ", f.read(12))
        if item in _GGUF_SCALAR:
            f.seek(_GGUF_SCALAR[item] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        f.seek(_GGUF_SCALAR[kind], os.SEEK_CUR)
