"""Process-wide speed settings (genlab.runtime) keep what they speed up correct."""

from __future__ import annotations

import random

import pytest
import torch
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.summary.writer import record_writer
from torch.utils.tensorboard import SummaryWriter

from genlab import runtime


def test_the_c_checksum_is_tensorboards_checksum():
    rng = random.Random(0)
    samples = [b"", b"a", bytes(range(256)), rng.randbytes(4096), rng.randbytes(100_003)]
    for data in samples:
        assert runtime.masked_crc32c(data) == masked_crc32c(data)


def test_event_files_written_with_the_c_checksum_pass_tensorboards_check(tmp_path):
    assert runtime.fast_tensorboard_checksums()
    assert record_writer.masked_crc32c is runtime.masked_crc32c
    with SummaryWriter(tmp_path) as writer:
        writer.add_scalar("train/loss", 1.5, 0)
        writer.add_image("samples", torch.rand(3, 64, 64), 0)
    (events,) = tmp_path.glob("events.out.tfevents.*")
    # TensorBoard's own reader checks every record's checksum in pure Python.
    reader = pywrap_tensorflow.PyRecordReader_New(str(events))
    records = 0
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            break
        records += 1
    assert records == 3  # the file version, the scalar and the image


def test_event_files_with_a_wrong_checksum_fail_tensorboards_check(tmp_path, monkeypatch):
    # The check above can fail: a writer with a wrong checksum is refused.
    monkeypatch.setattr(record_writer, "masked_crc32c", lambda data: 0)
    with SummaryWriter(tmp_path) as writer:
        writer.add_scalar("train/loss", 1.5, 0)
    (events,) = tmp_path.glob("events.out.tfevents.*")
    with pytest.raises(errors.DataLossError):
        pywrap_tensorflow.PyRecordReader_New(str(events)).GetNext()


def test_the_quiet_profiler_context_can_be_entered_again_and_nested():
    profiler = runtime.QuietProfiler()
    with profiler.profile("outer"), profiler.profile("inner"):
        pass
    with profiler.profile("again"):
        pass
