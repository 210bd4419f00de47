"""Process-wide speed settings (genlab.runtime) apply where they are safe, and only there."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

from genlab import runtime

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def test_the_cuda_check_is_cached_only_in_single_process_runs(monkeypatch):
    monkeypatch.setenv(NVML_CHECK, "1")  # as Lightning sets it
    for world_size, num_nodes in ((2, 1), (1, 2)):  # a process that may fork keeps it
        runtime.cache_cuda_check(SimpleNamespace(world_size=world_size, num_nodes=num_nodes))
        assert os.environ[NVML_CHECK] == "1"
    runtime.cache_cuda_check(SimpleNamespace(world_size=1, num_nodes=1))
    assert NVML_CHECK not in os.environ


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_in_the_process_on_glibc():
    assert runtime.keep_freed_memory()
