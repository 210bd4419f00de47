"""What each of genlab's speed-ups is worth, for ``benchmark.py --speedups``.

A callback, `Toggle`, added to an unchanged ``genlab-train`` command line with
``+callbacks.speedups._target_=speedups.Toggle +callbacks.speedups.path=<file>``
(``scripts/`` on PYTHONPATH), switches one speed-up off at a time: after a warm-up epoch,
every speed-up gets pairs of timed epochs, one with it and one without, in alternating
order. Epochs close to each other in one process see the same machine, so their
difference is the speed-up's worth with little of the noise between processes.
Each switch puts back what Lightning (or tensorboard) does without genlab's change.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl


def _method(name: str) -> Callable[[pl.Trainer, bool], None]:
    """Switch a method of genlab's LeanLightningModule; off, Lightning's own takes over."""
    from genlab.models.lean import LeanLightningModule

    genlab_method = LeanLightningModule.__dict__[name]

    def switch(trainer: pl.Trainer, on: bool) -> None:
        if on:
            setattr(LeanLightningModule, name, genlab_method)
        elif name in LeanLightningModule.__dict__:
            delattr(LeanLightningModule, name)

    return switch


def _log_gate(trainer: pl.Trainer, on: bool) -> None:
    """Off: per-step values go to Lightning at every step, not only on the steps it writes."""
    from genlab import private_api

    private_api.writes_step_logs = _WRITES_STEP_LOGS if on else (lambda trainer: True)


def _metric_sums(trainer: pl.Trainer, on: bool) -> None:
    """Off: training metrics through Lightning's self.log at every step (on_step and on_epoch),
    the divergence check on the device: no reads to Python floats, no sums, no gate."""
    import torch

    from genlab.errors import TrainingDiverged
    from genlab.models.lean import LeanLightningModule

    def log_metrics(self, split, metrics, batch_size):
        if split != "train":
            return _LOG_METRICS(self, split, metrics, batch_size)
        if not bool(torch.isfinite(torch.stack(list(metrics.values()))).all()):
            raise TrainingDiverged("Training diverged.")
        self._log("train", metrics, on_step=True, batch_size=batch_size)
        self._log("train", metrics, batch_size=batch_size)

    LeanLightningModule.log_metrics = _LOG_METRICS if on else log_metrics


def _cuda_check(trainer: pl.Trainer, on: bool) -> None:
    """Off: Lightning's PYTORCH_NVML_BASED_CUDA_CHECK=1, which torch does not cache."""
    if on:
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    else:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"


_WRITES_STEP_LOGS: Any = None
_LOG_METRICS: Any = None

# Each speed-up: what it is, and the switch that turns it on and off.
SPEEDUPS: dict[str, tuple[str, Callable[[], Callable[[pl.Trainer, bool], None]]]] = {
    "hook_name": (
        "`__setattr__` for Lightning's hook name (`models/lean.py`)",
        lambda: _method("__setattr__"),
    ),
    "log_gate": (
        "per-step values handed to Lightning on its logging steps only (`models/lean.py`)",
        lambda: _log_gate,
    ),
    "metric_sums": (
        (
            "training metrics read once and summed in Python, not self.log at every step "
            "(`models/lean.py`; includes the gate)"
        ),
        lambda: _metric_sums,
    ),
    "cuda_check": ("`cache_cuda_check` (`runtime.py`)", lambda: _cuda_check),
}


def schedule(pairs: int) -> list[tuple[str | None, bool, bool]]:
    """The epochs after the warm-up: (speed-up switched, whether it is on, whether the
    epoch is timed), in order. Each setting lasts two epochs and only the second is timed,
    so that nothing left over from the setting before (TensorBoard's writer thread still
    writing the last epoch's pictures, say) is counted."""
    epochs: list[tuple[str | None, bool, bool]] = []
    for i in range(pairs):
        for name in SPEEDUPS:
            for on in (True, False) if i % 2 == 0 else (False, True):
                epochs += [(name, on, False), (name, on, True)]
    return epochs


def epochs(pairs: int) -> int:
    """The ``trainer.max_epochs`` a run with ``Toggle(pairs=pairs)`` needs."""
    return 1 + len(schedule(pairs))


class Toggle(pl.Callback):
    """Switches the speed-ups as `schedule` says, and writes the wall time of each timed
    epoch to ``path`` (JSON) when training ends. ``trainer.max_epochs`` must be
    ``epochs(pairs)``."""

    def __init__(self, path: str, pairs: int = 3):
        global _WRITES_STEP_LOGS, _LOG_METRICS
        from genlab import private_api
        from genlab.models.lean import LeanLightningModule

        _WRITES_STEP_LOGS = private_api.writes_step_logs
        _LOG_METRICS = LeanLightningModule.log_metrics
        self.path = path
        self.epochs = [(None, True, False), *schedule(pairs)]  # a warm-up epoch first
        self.switches = {name: make() for name, (_, make) in SPEEDUPS.items()}
        self.records: list[dict[str, Any]] = []
        self._started = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name, on, _ = self.epochs[trainer.current_epoch]
        for other, switch in self.switches.items():
            switch(trainer, on or other != name)
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Pictures are drawn at this hook too; callbacks listed before this one have drawn them.
        name, on, timed = self.epochs[trainer.current_epoch]
        if timed:
            seconds = time.perf_counter() - self._started
            self.records.append({"speedup": name, "on": on, "seconds": seconds})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with open(self.path, "w") as f:
            json.dump(self.records, f)


def worth(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per speed-up, for each pair of timed epochs: (without - with) / without."""
    shares: dict[str, list[float]] = {name: [] for name in SPEEDUPS}
    for a, b in zip(records[::2], records[1::2]):
        on, off = (a, b) if a["on"] else (b, a)
        shares[a["speedup"]].append((off["seconds"] - on["seconds"]) / off["seconds"])
    return shares
