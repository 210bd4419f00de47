"""What keeps a run's work safe and repeatable.

`LastCheckpoint` is configured in ``conf/callbacks`` (``callbacks.last_checkpoint``);
`genlab.train` gives every run the others, outside the user-editable callbacks:

- `AtomicCheckpointIO`: a checkpoint is written beside its target and renamed
  into place, so a crash during a save never leaves a broken ``last.ckpt``;
- `SeedEachEpoch`: the random streams (Python, NumPy, torch) restart from
  (seed, epoch) at every training epoch and travel inside checkpoints, so a
  resumed run draws the same noise as an uninterrupted one;
- `StopOnInterrupt`: Ctrl-C (SIGINT) or SIGTERM finishes the current batch,
  saves ``last.ckpt`` and stops training; a second Ctrl-C stops at once;
- `OneLogHistory`: a resumed run tells TensorBoard to drop what the earlier
  attempt logged after its checkpoint (and drops those rows from the CSV log
  of `CSVLogger`, ``logger=csv``), so every step appears once.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import loggers as pl_loggers
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities.exceptions import SIGTERMException
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from genlab.run import LAST_CHECKPOINT

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves a checkpoint to ``.<name>.partial`` in the target's folder, syncs it
    to disk, then renames it over the target.

    Lightning's own save stages the file in the system temp folder; when that
    is another file system, the final move is a copy into the target, which a
    crash can cut short. A rename within one folder is atomic.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's way
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with partial.open("wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        # Make the rename itself durable.
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class LastCheckpoint(Checkpoint):
    """Keeps ``<dirpath>/last.ckpt``, what ``resume=last`` continues from, up to date.

    It is written at the end of every training epoch, every
    ``every_n_train_steps`` optimizer steps when set (mid-epoch checkpoints for
    long epochs; a GAN takes two steps per batch), and when training ends.

    Lightning's ``ModelCheckpoint(save_last=True)`` only writes ``last.ckpt``
    beside a top-k save: with a monitored metric it postpones step saves until
    the first validation, and with ``save_top_k=0`` (the GAN) it writes it only
    when training ends. As a `Checkpoint`, this runs after every
    ``ModelCheckpoint``, so the file records their latest best checkpoint.
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int | None = None):
        self.path = Path(dirpath) / LAST_CHECKPOINT
        self.every_n_train_steps = every_n_train_steps
        self._saved_at: int | None = None

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking or self._saved_at == trainer.global_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed for the training noise of one epoch, independent of the data order's."""
    return int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0])


def rng_state() -> dict[str, Any]:
    """The global random states, in types a ``weights_only`` checkpoint load accepts."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class SeedEachEpoch(pl.Callback):
    """Seeds Python, NumPy and torch from (seed, epoch) when a training epoch starts.

    The training noise of an epoch (VAE reparameterisation, GAN latents) then
    depends only on the seed and the epoch, not on what else drew random
    numbers before, so a run resumed at an epoch boundary repeats an
    uninterrupted one exactly. The states also travel in every checkpoint, for
    runs resumed mid-epoch.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed = epoch_seed(self.seed, trainer.current_epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # every CUDA device too

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_state(state_dict)


class StopOnInterrupt(pl.Callback):
    """Ctrl-C (or SIGTERM) ends training between two batches, with a checkpoint.

    Lightning already stops gracefully on SIGTERM: it finishes the running
    batch (and its logging), then raises `SIGTERMException`. The first Ctrl-C
    is turned into that same stop; when the exception passes through, this
    saves ``<checkpoint_dir>/last.ckpt``, from which ``resume=last`` continues
    exactly. A second Ctrl-C stops at once without saving.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.requested = False

    @contextlib.contextmanager
    def handling_ctrl_c(self) -> Iterator[None]:
        """Route Ctrl-C to this callback while the block (``trainer.fit``) runs."""
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread may handle signals
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning(
            "Ctrl-C: stopping after this batch and saving a checkpoint "
            "(press Ctrl-C again to stop at once without saving)."
        )
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler, installed during fit, takes it

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self.requested = True
            trainer.save_checkpoint(self.checkpoint_dir / LAST_CHECKPOINT, weights_only=False)


class _ContinuedCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            self.metrics_keys = self._read()[0]

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def drop_from(self, step: int) -> None:
        """Forget the rows logged at ``step`` or later."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        keys, rows = self._read()
        with self._fs.open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(row for row in rows if int(row["step"]) < step)


class CSVLogger(pl_loggers.CSVLogger):
    """Lightning's CSV logger, keeping the rows of earlier attempts when a run is resumed.

    Lightning's own deletes ``metrics.csv`` whenever its folder is reused, so a
    resumed run would lose the history of the epochs before its checkpoint.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedCSVWriter(log_dir=self.log_dir)
        return self._experiment


class OneLogHistory(pl.Callback):
    """Keeps one TensorBoard history across a resume.

    An attempt that crashed after its last checkpoint has logged steps the
    resumed run will log again. At the resumed run's first batch this writes
    TensorBoard's restart marker (what ``SummaryWriter(purge_step=...)``
    writes), which makes TensorBoard drop the earlier events from that step on.
    """

    def __init__(self) -> None:
        self._pending = True

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self._pending:
            return
        self._pending = False
        if trainer.ckpt_path is None:
            return
        # The step Lightning's loggers record this batch under.
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                restart = Event(step=step, session_log=SessionLog(status=SessionLog.START))
                logger.experiment.file_writer.add_event(restart)
            elif isinstance(logger, CSVLogger):
                logger.experiment.drop_from(step)
