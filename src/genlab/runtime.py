"""Process-wide settings that remove measured costs from training and evaluation."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
from typing import TYPE_CHECKING, Any

from pytorch_lightning.profilers import PassThroughProfiler

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
    """Let freed tensor memory be reused inside the process instead of going back to the kernel.

    glibc serves large blocks with fresh ``mmap``s and returns the top of the
    heap to the kernel whenever enough of it is free. A loop that frees and
    allocates the same large tensors over and over (an epoch's batches, the
    thousands of decodings per test image of the importance-sampled
    likelihood) then page-faults every page of them each time: measured, that
    doubled the time of ``genlab-eval eval.nll_samples=5000``. Raising both
    thresholds keeps freed blocks for reuse; the process holds on to its peak
    memory until it exits. Returns whether the setting applied (glibc only).

    Evaluation sets it (`genlab.evaluate.evaluate_model`); training does not:
    there it left the forward and backward passes as fast as before and made
    torch's fused Adam step slower, 0.8 against 1.25 ms per step of the seed
    VAE's plain loop at batch 128 and at batch 1024 (3 runs each, 2 CPU threads).
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

    Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that asking whether
    CUDA is available never initialises CUDA in a process that may fork
    later. That answer is then not cached, and torch's Adam asks on every
    step: about 0.1 ms per step, measured (1 % of a seed VAE step on a CPU).
    A run on one device in one process does not fork, so the setting is
    dropped there; DDP runs keep it.
    """
    if trainer.world_size == 1 and trainer.num_nodes == 1:
        os.environ.pop(_NVML_CHECK, None)


# TFRecord's mask of a record's CRC-32C (TensorFlow's crc32c::Mask), which TensorBoard checks.
_CRC_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C of ``data``, as TensorBoard's event files store it, computed in C."""
    import google_crc32c

    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | ((crc << 17) & _U32)) + _CRC_MASK_DELTA) & _U32


@functools.cache
def fast_tensorboard_checksums() -> bool:
    """Let TensorBoard's event writer checksum its records in C instead of pure Python.

    Every record TensorBoard writes (torch.utils.tensorboard, which Lightning's
    TensorBoardLogger uses) carries a CRC-32C that tensorboard computes in
    pure Python: about 0.3 s per MB. One epoch's pictures are about 330 KB of
    PNG, so after every epoch the writer's thread spends about 0.1 s in that
    loop, holding the GIL that the training loop needs back after every
    tensor op. Measured on the seed VAE (2 CPU threads): 60 training steps
    took 0.35 s alone and 0.44 s beside that loop, and the few tiny tensor ops
    of the epoch's metric logging took 14-82 ms instead of 5-14 ms.
    google-crc32c computes the same checksum in C; the files are byte for
    byte the same. Returns whether it applied (it needs google-crc32c's C
    extension and tensorboard's writer as this knows it).
    """
    try:
        import google_crc32c
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    if google_crc32c.implementation != "c" or not hasattr(record_writer, "masked_crc32c"):
        return False
    record_writer.masked_crc32c = _masked_crc32c
    return True


# One reusable context that does nothing (nullcontext may be entered any number of times).
_NOT_PROFILED = contextlib.nullcontext()


class QuietProfiler(PassThroughProfiler):
    """Lightning's default profiler (none), without the cost of saying so.

    Lightning wraps every hook call in ``trainer.profiler.profile(name)``:
    each callback at each of six hooks per training step, about 75 calls a
    step with genlab's callbacks. The default profiler's ``profile`` builds a
    generator-based context manager each time, for nothing; this one hands
    back one shared context that does nothing. genlab trains with it unless
    ``trainer.profiler`` names a real profiler.
    """

    def profile(self, action_name: str) -> Any:
        return _NOT_PROFILED
