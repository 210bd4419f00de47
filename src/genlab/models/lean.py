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


class _DeviceSums:
    """Running sums over the examples of one training epoch kept on the device, with a
    flag that a value was NaN or infinite: a step adds to them without waiting for the
    device, and the host reads them only when it must (`LeanLightningModule.check_finite`)."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.totals: Tensor | None = None
        self.bad: Tensor | None = None
        self.count = 0

    def add(self, metrics: dict[str, Tensor], batch_size: int) -> None:
        values = torch.stack([value.detach() for value in metrics.values()])
        # Sums over an epoch's steps in float64, as the host's Python floats (MPS has none).
        values = values.to(torch.float32 if values.device.type == "mps" else torch.float64)
        bad = ~torch.isfinite(values)
        if self.totals is None:
            self.names, self.totals, self.bad = tuple(metrics), values * batch_size, bad
        else:
            self.totals.add_(values, alpha=batch_size)
            self.bad.logical_or_(bad)
        self.count += batch_size

    def host(self) -> _EpochSums:
        """The sums as host floats (one read from the device)."""
        if self.totals is None:
            return _EpochSums()
        return _EpochSums(dict(zip(self.names, self.totals.tolist())), self.count)

    def non_finite(self) -> list[str]:
        """Names of the metrics that were NaN or infinite at some step so far (one read)."""
        if self.bad is None:
            return []
        return [name for name, bad in zip(self.names, self.bad.tolist()) if bad]


class LeanLightningModule(pl.LightningModule):
    """A LightningModule whose training metrics cost at most one read per step.

    On a CPU, `log_metrics` reads a training step's metrics to the host once (which is
    also how a NaN or infinite loss stops training, with `TrainingDiverged`, at that
    step) and sums them in Python over the epoch. On a GPU, where such a read waits for
    the device to finish the step, it adds them to sums on the device instead, and the
    host reads those, with a NaN flag, only on the steps Lightning writes out (every
    ``trainer.log_every_n_steps``), on the epoch's last step and before any checkpoint
    is saved: training stops within ``log_every_n_steps`` steps of a NaN, and never saves
    weights from after it. The metrics go to Lightning only on the steps it writes out
    (``train/<name>_step``) and at the end of the epoch (``train/<name>``). Validation
    and test metrics go to Lightning's ``self.log`` as usual.
    """

    # What the progress bar shows of the logged metrics.
    prog_bar_metrics: tuple[str, ...] = ("loss",)

    # Where a step's training metrics are summed: "host" (Python floats, read every step)
    # or "device" (no read until the host needs them). "auto": host on a CPU, else device.
    metric_sums: str = "auto"

    def __init__(self) -> None:
        super().__init__()
        self._epoch_sums: _EpochSums | _DeviceSums = _EpochSums()

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
        writes = private_api.writes_step_logs(self.trainer)
        sums = self._epoch_sums
        if isinstance(sums, _DeviceSums):
            sums.add(metrics, batch_size)
            # At the epoch's last step too: before validation, pictures and checkpoints
            # use the weights.
            if writes or self.trainer.is_last_batch:
                self.check_finite()
        else:
            values = _floats(metrics.values())
            bad = [f"train/{k}={v}" for k, v in zip(metrics, values) if not math.isfinite(v)]
            if bad:
                raise TrainingDiverged(
                    f"Training diverged: {', '.join(bad)} at epoch {self.current_epoch}, "
                    f"step {self.global_step}."
                )
            sums.add(metrics, values, batch_size)
        if writes:
            self._log("train", metrics, on_step=True, batch_size=batch_size)

    def check_finite(self) -> None:
        """Raise `TrainingDiverged` if a training metric summed on the device was NaN or
        infinite since the epoch began (a read from the device; nothing to do on the host)."""
        sums = self._epoch_sums
        if isinstance(sums, _DeviceSums) and (bad := sums.non_finite()):
            names = ", ".join(f"train/{name}" for name in bad)
            raise TrainingDiverged(
                f"Training diverged: {names} became NaN or infinite in epoch "
                f"{self.current_epoch}, by step {self.global_step}."
            )

    def _sums_on_device(self) -> bool:
        if self.metric_sums == "auto":
            return self.device.type != "cpu"
        return self.metric_sums == "device"

    def on_train_epoch_start(self) -> None:
        self._epoch_sums = _DeviceSums() if self._sums_on_device() else _EpochSums()

    def on_train_epoch_end(self) -> None:
        self.check_finite()
        epoch = self._epoch_sums
        if isinstance(epoch, _DeviceSums):
            epoch = epoch.host()
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
        # Numbered from 0 as the progress bar, checkpoints and pictures number epochs.
        epoch = self.current_epoch
        last = self.trainer.max_epochs
        of = f" ({epoch + 1} of {last})" if last is not None and last >= 0 else ""
        log.info("Epoch %d%s: %s", epoch, of, numbers)

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
        # Raising here stops the save before anything is written.
        self.check_finite()
        broken = [n for n, p in self.named_parameters() if not torch.isfinite(p).all()]
        if broken:
            raise TrainingDiverged(
                f"Training diverged: the weights {', '.join(broken[:3])} became NaN or "
                f"infinite in epoch {self.current_epoch}, by step {self.global_step}."
            )
        sums = self._epoch_sums
        if isinstance(sums, _DeviceSums):
            sums = sums.host()
        checkpoint[_EPOCH_SUMS_KEY] = {"sums": dict(sums.sums), "count": sums.count}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A run resumed mid-epoch does not start the epoch again (no
        # on_train_epoch_start): it carries on with the sums saved with it.
        saved = checkpoint.get(_EPOCH_SUMS_KEY)
        if saved is not None:
            self._epoch_sums = _EpochSums(saved["sums"], saved["count"])

    def on_train_start(self) -> None:
        # A run resumed mid-epoch carries its sums as host floats; on a GPU they move to the
        # device here, once the model is there (it is not yet when the checkpoint loads).
        sums = self._epoch_sums
        if isinstance(sums, _EpochSums) and sums.count and self._sums_on_device():
            dtype = torch.float32 if self.device.type == "mps" else torch.float64
            on_device = _DeviceSums()
            on_device.names = tuple(sums.sums)
            on_device.totals = torch.tensor(
                list(sums.sums.values()), dtype=dtype, device=self.device
            )
            on_device.bad = torch.zeros(len(sums.sums), dtype=torch.bool, device=self.device)
            on_device.count = sums.count
            self._epoch_sums = on_device
