"""Ctrl-C and SIGTERM: training stops between two batches, with a checkpoint to resume from."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from genlab.rundir import LAST_CHECKPOINT

log = logging.getLogger(__name__)


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
