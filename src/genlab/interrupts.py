"""Ctrl-C and SIGTERM in every phase of a run: a stop is never mistaken for success, and
``last.ckpt`` only ever holds training state.

Phases of a run, and what a stop does in each:

    set-up      (before the run is accepted)  exits at once; the run directory is unchanged
    training, validation  the running batch finishes; last.ckpt is saved; metrics.json says interrupted
    test, evaluation, writing results         stops at once; last.ckpt is left as training wrote it
                                              (resume=last then tests again without training)

The exit code is 130 after Ctrl-C (SIGINT) and 143 after SIGTERM, the shells' codes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn, TrainerStatus
from pytorch_lightning.utilities.exceptions import SIGTERMException

from genlab import private_api
from genlab.errors import Interrupted, signals_handled
from genlab.rundir import LAST_CHECKPOINT

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Phases in which Lightning's training loop takes the stop between two batches.
_GRACEFUL = ("training", "validation")
# Phases in which a signal changes nothing: the results are written ("done"), or the stop
# is being recorded ("stopping").
_SETTLED = ("done", "stopping")


class StopSignals(pl.Callback):
    """Ctrl-C and SIGTERM for the whole of a run (see the module's table).

    In training and validation the first signal asks Lightning's loop for the
    stop it makes on SIGTERM: it finishes the running batch (and its logging),
    then raises `SIGTERMException`, when this saves ``<checkpoint_dir>/last.ckpt``
    and ``resume=last`` continues exactly. A second signal stops at once
    without saving. In any other phase a signal raises `Interrupted` at once.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.phase = "set-up"
        self.signum: int | None = None  # the first stop signal received
        self.stopped_in: str | None = None  # the phase it arrived in
        self.trainer: pl.Trainer | None = None

    def installed(self) -> contextlib.AbstractContextManager[None]:
        """Route Ctrl-C and SIGTERM here while the block (the run) lasts."""
        return signals_handled(STOP_SIGNALS, self._on_signal)

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _on_signal(self, signum: int, frame: Any) -> None:
        # During training Lightning's own SIGTERM handler runs first, then calls this one.
        if self.phase in _SETTLED:  # results written, or the stop being recorded: let it end
            return
        first = self.signum is None
        if first:
            self.signum, self.stopped_in = signum, self.phase
        trainer = self.trainer
        in_fit = (
            trainer is not None
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.state.status == TrainerStatus.RUNNING
        )
        graceful = first and self.phase in _GRACEFUL and in_fit
        if graceful and private_api.request_sigterm_stop(self.trainer):
            log.warning(
                "%s: stopping after this batch and saving a checkpoint "
                "(press Ctrl-C again to stop at once without saving).",
                "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name,
            )
            return
        raise Interrupted(signum, self.phase)

    def _ask_again(self, trainer: pl.Trainer) -> None:
        # Lightning forgets a stop asked for before its fit installed its handlers.
        if self.signum is not None and not trainer.received_sigterm:
            private_api.request_sigterm_stop(trainer)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ask_again(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ask_again(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.phase = "validation"

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.phase = "training"

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Only a stop of fit saves: outside it the weights may be the tested checkpoint's.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            if self.signum is None:  # Lightning's handler alone (this one was not installed)
                self.signum, self.stopped_in = signal.SIGTERM, self.phase
            trainer.save_checkpoint(self.checkpoint_dir / LAST_CHECKPOINT, weights_only=False)
