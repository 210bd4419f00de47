"""Every use genlab makes of a private part of Lightning, Hydra, TensorBoard or torch.

After upgrading any of them, check this file first: ``pytest tests/test_private_api.py``
tests each use against the installed versions. Each function falls back to plain public
behaviour when the private name has gone, so an upgrade that moves one makes genlab
slower or plainer, never wrong.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch import nn
    from torch.utils.tensorboard import SummaryWriter


# -- Lightning ----------------------------------------------------------------------------------

# The attribute Lightning sets on a LightningModule before and after every hook call.
HOOK_NAME_ATTRIBUTE = "_current_fx_name"


def writes_step_logs(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this training step's logged values to the loggers
    (every ``trainer.log_every_n_steps`` steps); True when that cannot be told."""
    connector = getattr(trainer, "_logger_connector", None)
    return getattr(connector, "should_update_logs", True)


def logged_step(trainer: pl.Trainer) -> int:
    """The step Lightning's loggers record the current training batch under."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


def dump_checkpoint(trainer: pl.Trainer) -> dict[str, Any]:
    """What ``trainer.save_checkpoint`` would write now (weights, optimiser and loop state,
    callbacks' states), as a dict, without writing it."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def request_sigterm_stop(trainer: pl.Trainer) -> bool:
    """Ask Lightning's loops for the stop they make after SIGTERM: the running batch
    finishes, then `SIGTERMException`. False when this Lightning cannot be asked."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not hasattr(connector, "received_sigterm"):
        return False
    connector.received_sigterm = True
    return True


# -- torch ----------------------------------------------------------------------------------------


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` has been called on this module."""
    return getattr(module, "_compiled_call_impl", None) is not None


# -- TensorBoard ----------------------------------------------------------------------------------


def event_file_writer(writer: SummaryWriter) -> Any:
    """The event file behind a ``SummaryWriter``, opened again if it was closed, to which
    ready-made summaries (an encoded PNG, the HParams table) are added as they are."""
    return writer._get_file_writer()


# -- Hydra ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def hydra_task_module(module: str) -> Iterator[None]:
    """While the block runs, ``hydra.main`` takes its task function to live in ``module``,
    and names the job (and its log file, ``<last part of module>.log``) after it.

    Hydra reads the override from ``HYDRA_MAIN_MODULE`` (``hydra._internal.utils``). The
    job name could also be set in a config (``hydra.job.name``), but not in the one a run
    directory keeps (``.hydra/config.yaml``), from which a run is reproduced.
    """
    previous = os.environ.get("HYDRA_MAIN_MODULE")
    os.environ["HYDRA_MAIN_MODULE"] = module
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HYDRA_MAIN_MODULE", None)
        else:
            os.environ["HYDRA_MAIN_MODULE"] = previous


@contextlib.contextmanager
def hydra_errors_rewritten(rewrite: Callable[[Callable[[], Any]], Any]) -> Iterator[None]:
    """Route the work of ``hydra.main`` (composing the config, then running the task)
    through ``rewrite(work)`` while the block runs.

    ``hydra.main`` reports composition errors itself, in
    ``hydra._internal.utils.run_and_report``, before any genlab code runs: wrapping that
    reporter is the only way to reword them. Another Hydra layout keeps its own reports.
    """
    try:
        from hydra._internal import utils as hydra_utils
    except ImportError:
        yield
        return
    report = getattr(hydra_utils, "run_and_report", None)
    if report is None:
        yield
        return
    hydra_utils.run_and_report = lambda work: report(lambda: rewrite(work))
    try:
        yield
    finally:
        hydra_utils.run_and_report = report
