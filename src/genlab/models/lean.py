"""A LightningModule that costs a small model less per training step.

Lightning's per-step machinery (hook calls, logging, checks) costs about as much as a
whole step of the seed VAE on a CPU. Each piece here removes a measured part of that
cost: docs/PERFORMANCE.md says why, and BENCHMARKS.md how much each is worth now.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from genlab import private_api
from genlab.errors import TrainingDiverged

log = logging.getLogger(__name__)

# Checkpoint entry holding the running sums of the current training epoch, so that a
# run resumed mid-epoch still logs the mean over the whole epoch.
_EPOCH_SUMS_KEY = "genlab_epoch_sums"


def _floats(tensors: Iterable[Tensor]) -> list[float]:
    """The values of one-element tensors on one device, as Python floats."""
    tensors = tuple(tensors)
    if tensors and tensors[0].device.type == "cpu":
        return [t.item() for t in tensors]  # right after a step's kernels, cheaper than a stack
    return torch.stack([t.detach() for t in tensors]).tolist()  # one copy from a GPU


class _EpochSums:
    """Running sums over the examples of one training epoch, by metric name, in Python
    floats: float64, and no tensor ops in the step."""

    def __init__(self, sums: dict[str, float] | None = None, count: int = 0):
        self.sums = {name: float(value) for name, value in (sums or {}).items()}
        self.count = count

    def add(self, names: Iterable[str], values: list[float], batch_size: int) -> None:
        sums = self.sums
        for name, value in zip(names, values):
            sums[name] = sums.get(name, 0.0) + value * batch_size
        self.count += batch_size


class LeanLightningModule(pl.LightningModule):
    """A LightningModule whose training metrics cost one read per step.

    `log_metrics` reads a training step's metrics to the host once (which is also how a
    NaN or infinite loss stops training, with `TrainingDiverged`, before anything is
    saved from the broken weights), sums them in Python over the epoch, and hands them
    to Lightning only on the steps it writes out (``train/<name>_step``, every
    ``trainer.log_every_n_steps``) and at the end of the epoch (``train/<name>``).
    Validation and test metrics go to Lightning's ``self.log`` as usual.
    """

    # What the progress bar shows of the logged metrics.
    prog_bar_metrics: tuple[str, ...] = ("loss",)

    def __init__(self) -> None:
        super().__init__()
        self._epoch_sums = _EpochSums()

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning records the hook it is in before and after every hook call (about 46
        # times a training step); nn.Module.__setattr__ would check each time whether the
        # value is a parameter or a buffer, which a hook's name never is.
        if name == private_api.HOOK_NAME_ATTRIBUTE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def log_metrics(self, split: str, metrics: dict[str, Tensor], batch_size: int) -> None:
        """Log ``metrics`` as ``split/<name>``, the mean over the epoch's examples; for
        training also ``train/<name>_step`` on the steps Lightning writes out."""
        if split != "train":
            self._log(split, metrics, batch_size=batch_size)
            return
        values = _floats(metrics.values())
        bad = [f"train/{k}={v}" for k, v in zip(metrics, values) if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(
                f"Training diverged: {', '.join(bad)} at epoch {self.current_epoch}, "
                f"step {self.global_step}."
            )
        self._epoch_sums.add(metrics, values, batch_size)
        if private_api.writes_step_logs(self.trainer):
            self._log("train", metrics, on_step=True, batch_size=batch_size)

    def on_train_epoch_start(self) -> None:
        self._epoch_sums = _EpochSums()

    def on_train_epoch_end(self) -> None:
        epoch = self._epoch_sums
        if epoch.count:
            # Summed over all processes (DDP), count last, before dividing: the exact mean.
            totals = torch.tensor([*epoch.sums.values(), float(epoch.count)], device=self.device)
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
            means = dict(zip(epoch.sums, totals[:-1] / totals[-1]))
            self._log("train", means, sync_dist=False)
            if self.trainer.is_global_zero:
                self._report_epoch({f"train/{name}": float(v) for name, v in means.items()})

    def _report_epoch(self, train: dict[str, float]) -> None:
        """One line per epoch in the console log (and train.log): the epoch's training means
        and the latest validation numbers."""
        val = {
            k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")
        }
        numbers = ", ".join(f"{k} {v:.4g}" for k, v in {**train, **val}.items())
        last = self.trainer.max_epochs
        of = f"/{last}" if last is not None and last >= 0 else ""
        log.info("Epoch %d%s: %s", self.current_epoch + 1, of, numbers)

    def _log(
        self, split: str, metrics: dict[str, Tensor], on_step: bool = False, **kwargs: Any
    ) -> None:
        """Log as ``split/<name>`` once per epoch (reduced across devices unless
        ``sync_dist=False``), or as ``split/<name>_step`` for this step."""
        suffix = "_step" if on_step else ""
        # Lightning takes prog_bar per call, so metrics shown in the bar go in a call of their own.
        for prog_bar in (True, False):
            values = {
                f"{split}/{name}{suffix}": value
                for name, value in metrics.items()
                if (name in self.prog_bar_metrics) == prog_bar
            }
            if values:
                self.log_dict(
                    values,
                    on_step=on_step,
                    on_epoch=not on_step,
                    prog_bar=prog_bar,
                    **{"sync_dist": not on_step, **kwargs},
                )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sums = self._epoch_sums
        checkpoint[_EPOCH_SUMS_KEY] = {"sums": dict(sums.sums), "count": sums.count}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A run resumed mid-epoch does not start the epoch again (no
        # on_train_epoch_start): it carries on with the sums saved with it.
        saved = checkpoint.get(_EPOCH_SUMS_KEY)
        if saved is not None:
            self._epoch_sums = _EpochSums(saved["sums"], saved["count"])
