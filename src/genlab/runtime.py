"""Process-wide settings that remove measured costs from training and evaluation
(docs/PERFORMANCE.md says why, BENCHMARKS.md how much each is worth now)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
from typing import TYPE_CHECKING, Any

from pytorch_lightning.profilers import PassThroughProfiler

from genlab import private_api

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


# TFRecord's mask of a record's CRC-32C (TensorFlow's crc32c::Mask), which TensorBoard checks.
_CRC_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C of ``data``, as TensorBoard's event files store it, computed in C."""
    import google_crc32c

    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | ((crc << 17) & _U32)) + _CRC_MASK_DELTA) & _U32


@functools.cache
def fast_tensorboard_checksums() -> bool:
    """Let TensorBoard's event writer checksum its records in C (google-crc32c) instead of
    pure Python, whose loop held the GIL against training after every epoch's pictures.
    The files are byte for byte the same. Returns whether it applied."""
    try:
        import google_crc32c
    except ImportError:
        return False
    return google_crc32c.implementation == "c" and private_api.set_record_checksum(masked_crc32c)


# One reusable context that does nothing (nullcontext may be entered any number of times).
_NOT_PROFILED = contextlib.nullcontext()


class QuietProfiler(PassThroughProfiler):
    """Lightning's default profiler (none), without building a context manager for each of
    the ~75 hook calls of a training step. genlab trains with it unless
    ``trainer.profiler`` names a real profiler."""

    def profile(self, action_name: str) -> Any:
        return _NOT_PROFILED
