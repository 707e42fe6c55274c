"""glibc's malloc, asked to hand freed memory back to the OS.

Quantizing a model frees large buffers (activations, the float model, Hessians) that
glibc may keep for reuse: its mmap threshold rises to the size of the largest block freed,
and memory freed below the top of an arena stays mapped. The process's resident memory
then stays at its peak while the next step (an ONNX export, onnxruntime-genai's builder)
allocates on top. Elsewhere than glibc (macOS, musl) these do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Any

#: Allocations at least this large are mapped from, and unmapped back to, the OS.
LARGE_ALLOCATION_BYTES = 1 << 20


def _libc() -> Any | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def return_large_frees_to_the_os() -> None:
    """Fix glibc's mmap threshold at :data:`LARGE_ALLOCATION_BYTES`, for the process.

    glibc gives threads arenas of their own and, by default, raises its mmap threshold to
    the size of each large block freed, so later blocks of that size come from the arenas,
    and what one thread frees the others cannot reuse. The calibration pass allocates each
    batch's activations on a thread of its own: SmolLM2's GPTQ then peaked at 5.2 GB where
    the activations need under 1 GB (tests/test_layerwise.py measures the growth). A fixed
    threshold turns that adjustment off: blocks of 1 MiB and more are mapped and unmapped
    whole, at the cost of the kernel zeroing their pages.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        m_mmap_threshold = -3  # from glibc's malloc.h
        mallopt(m_mmap_threshold, LARGE_ALLOCATION_BYTES)


def trim_heap() -> None:
    """Collect unreachable objects, then return the free memory of every arena to the OS
    (``malloc_trim(0)``), so that the next step's peak does not stack on this one's."""
    gc.collect()
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)
