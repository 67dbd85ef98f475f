"""Peak memory of a code region: CUDA allocator peak on GPU, sampled resident set size on CPU."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from typing import Any, Iterator, Optional, Protocol

import torch

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
