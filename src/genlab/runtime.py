"""Process-wide settings that remove measured costs from training and evaluation
(docs/PERFORMANCE.md says why, BENCHMARKS.md how much each is worth now)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytorch_lightning as pl

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest allowed mmap threshold on 64-bit systems.
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
_NEVER_TRIM = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Let freed memory be reused inside the process instead of going back to the kernel.

    A loop that frees and allocates the same large tensors (the thousands of decodings
    per test image of the importance-sampled likelihood) otherwise page-faults them in
    again every time. The process keeps its peak memory until it exits. Evaluation sets
    it; training does not (it made Adam's fused step slower). Returns whether it applied
    (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    )


# Set by Lightning when imported (lightning_fabric/__init__.py).
_NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def cache_cuda_check(trainer: pl.Trainer) -> None:
    """Let ``torch.cuda.is_available()`` cache its answer in single-process runs.

    Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that asking never initialises
    CUDA in a process that may fork later; the answer is then not cached, and Adam asks
    at every step. A run on one device in one process does not fork; DDP runs keep it.
    """
    if trainer.world_size == 1 and trainer.num_nodes == 1:
        os.environ.pop(_NVML_CHECK, None)
