"""Devices: which one to run on, at what precision, how much memory a run peaked at, and the one
out-of-memory retry that the trainer and the evaluation share (``halve_on_oom``)."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from .errors import ConfigError
from .memory import HOST_HEAP_BLOCK_MAX, HOST_TRIM_THRESHOLD

T = TypeVar("T")


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then the CPU; otherwise the named device, if it is there."""
    if requested != "auto":
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise ConfigError(f"Unknown device '{requested}'; use auto, cpu, cuda, cuda:N "
                              "or mps.") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("Device 'cuda' was requested but CUDA is not available here.")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("Device 'mps' was requested but MPS is not available here.")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _libc() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl): its allocator is left as it is
        return None


def keep_host_memory() -> bool:
    """Ask glibc to serve blocks up to ``HOST_HEAP_BLOCK_MAX`` from its heap and to keep freed
    memory there. By default every block over 32 MB is mapped fresh and unmapped when freed, so
    each training step's [batch, d_sae] tensors are zero-filled page by page again (18,432 page
    faults per step at 8x, batch 4096: ~10% of a TopK step on 2 cores). Process-wide; the
    trainer calls it on the CPU; ``release_host_memory`` gives the memory back afterwards.
    Returns whether the allocator took it (False off glibc)."""
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, HOST_HEAP_BLOCK_MAX)  # type: ignore[attr-defined]
                and libc.mallopt(m_trim_threshold, HOST_TRIM_THRESHOLD))  # type: ignore


def release_host_memory() -> None:
    """Return the heap's free memory to the system (glibc ``malloc_trim``), e.g. after a
    training in a long-lived worker."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)  # type: ignore[attr-defined]


def pick_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that supports it (else fp16), fp32 on the CPU."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def halve_on_oom(
    run: Callable[[int], T], size: int, *, minimum: int = 1,
    on_halve: Callable[[int], None] | None = None,
    too_small: Callable[[int], Exception] | None = None,
) -> tuple[T, int]:
    """``run(size)``; on out-of-memory free the CUDA cache, halve ``size`` and call again.

    Returns ``(result, size)`` with the size that worked (callers keep it for later calls).
    ``on_halve(new_size)`` is told of each halving (e.g. to log it and reset gradients). When
    ``size // 2`` would fall below ``minimum``, raises ``too_small(size)`` if given, else the
    out-of-memory error itself. Any other error is raised as it is.
    """
    while True:
        try:
            return run(size), size
        except Exception as exc:
            if not is_oom(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if size // 2 < max(1, minimum):
                if too_small is not None:
                    raise too_small(size) from None
                raise
            size //= 2
            if on_halve is not None:
                on_halve(size)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated; CPU: the process's peak RSS — VmHWM where /proc has it (ru_maxrss
    of a process started by fork+exec can carry its parent's peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
