"""A Lightning callback that records when each training epoch starts, for scripts/benchmark.py.

Added to an unchanged ``genlab-train`` command line with
``+callbacks.clock._target_=epoch_clock.EpochClock +callbacks.clock.path=<file>``
(``scripts/`` on PYTHONPATH). It costs one Python call per batch.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytorch_lightning as pl


class EpochClock(pl.Callback):
    """Writes ``{"epoch_starts": [...], "end": t}`` (Unix times) to ``path`` when fit ends."""

    def __init__(self, path: str):
        self.path = path
        self.epoch_starts: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            self.epoch_starts.append(time.time())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with open(self.path, "w") as f:
            json.dump({"epoch_starts": self.epoch_starts, "end": time.time()}, f)
