"""Loggers as genlab configures them (conf/logger/)."""

from __future__ import annotations

from typing import Any

from pytorch_lightning import loggers as pl_loggers


class TensorBoardLogger(pl_loggers.TensorBoardLogger):
    """Lightning's TensorBoard logger without the ``epoch`` scalar Lightning adds to every
    write: a staircase that would open the Scalars and Time Series tabs, ahead of the
    loss curves. The x axis is the step; checkpoints and picture files name the epoch."""

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = {key: value for key, value in metrics.items() if key != "epoch"}
        if metrics:
            super().log_metrics(metrics, step)
