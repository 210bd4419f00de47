"""genlab's commands: genlab-train, genlab-eval and genlab-report.

Each reads its command line (Hydra composes the config), hands the work to
`genlab.train`, `genlab.evaluate` or `genlab.report`, and turns the outcome into an exit
code. Nothing here imports torch: ``--help`` and ``--cfg job`` answer at once, and the
work imports what it needs when it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from genlab import private_api, report
from genlab.config import CONF_DIR, hydra_errors
from genlab.continuation import objective
from genlab.errors import (
    FolderTaken,
    GenlabError,
    Interrupted,
    exit_code,
    find_user_error,
    sigterm_raises,
    user_errors,
)
from genlab.rundir import record_failure

log = logging.getLogger(__name__)


def _exit_code(metrics: dict[str, Any]) -> int:
    """0 for a completed run; 1 for a diverged one; 130 or 143 (the shells' codes for
    SIGINT and SIGTERM) for an interrupted one."""
    if metrics["status"] == "interrupted":
        return exit_code(metrics["signal"])
    return 0 if metrics["status"] == "completed" else 1


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> float | None:
    """One run, or one job of a sweep.

    Returns the metrics.json entry named by ``objective`` (for sweepers that
    optimise it, e.g. Optuna), NaN for a job that failed or does not report it.
    """
    from genlab.train import train

    if not _in_sweep():
        with user_errors():
            metrics = train(cfg)
        code = _exit_code(metrics)
        if code:
            raise SystemExit(code)
        return objective(cfg, metrics)
    with user_errors():
        _refuse_local_ddp_sweep(cfg)
    # A rerun of a sweep into its folder continues it (genlab.continuation). One failing
    # job must not end a sweep (Hydra stops at the first job that raises): record the
    # failure in the job's metrics.json and move on. A diverged job has said so in its
    # metrics.json; the others go on too.
    from genlab.continuation import Plan, plan_job, record_attempt

    sweep_dir, job = Path(HydraConfig.get().sweep.dir), Path(cfg.paths.output_dir).name
    # Messages about a folder this job may not own are printed, not logged: its train.log
    # belongs to the run that wrote it.

    def refused(reason: GenlabError) -> float | None:
        record_attempt(sweep_dir, job, "refused")
        print(f"Job {job} refused: {reason}", file=sys.stderr)
        return objective(cfg, {})

    try:
        plan = plan_job(cfg) if cfg.resume is None else Plan("run")
    except GenlabError as err:  # another job's folder, or a damaged record
        return refused(err)
    record_attempt(sweep_dir, job, plan.action)
    if plan.action == "reuse":
        print(f"Job {job} finished earlier ({plan.metrics['status']}): reused, nothing ran.")
        return objective(cfg, plan.metrics)
    if plan.action == "resume":
        print(f"Job {job} stopped earlier: continuing it from its last.ckpt.")
        cfg.resume = "last"
    try:
        metrics = train(cfg)
    except Exception as err:
        user_error = find_user_error(err)
        if isinstance(user_error, FolderTaken):  # in use by another command
            return refused(user_error)
        record_failure(
            Path(cfg.paths.output_dir), cfg, user_error or err
        )  # creates train.log's folder
        if user_error is not None:
            log.error("Job failed: %s", user_error)
        else:
            log.exception("Job failed")
        return objective(cfg, {})
    if metrics["status"] == "interrupted":  # Ctrl-C stops the whole sweep
        raise SystemExit(_exit_code(metrics))
    return objective(cfg, metrics)


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _refuse_local_ddp_sweep(cfg: DictConfig) -> None:
    """Lightning's DDP starts its other processes by re-running the command line,
    which inside a local multirun would re-run the whole sweep."""
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    trainer = cfg.trainer
    processes = (trainer.get("devices") or 1) * (trainer.get("num_nodes") or 1)
    strategy = str(trainer.get("strategy") or "")
    if strategy.startswith("ddp") and processes != 1 and not SLURMEnvironment.detect():
        raise GenlabError(
            f"trainer.strategy={strategy} with {processes} processes cannot run inside a "
            "local sweep (-m): Lightning starts DDP's other processes by re-running the "
            "command, which would re-run the sweep. Sweep DDP runs on a cluster with "
            "hydra/launcher=slurm (SLURM starts the processes), run each DDP job on its own "
            "without -m, or sweep with trainer.devices=1."
        )


def train_command() -> None:
    """``genlab-train``: one training run, or a sweep with ``-m``."""
    report.refused_jobs.clear()
    with (
        _stops_reported(),
        private_api.hydra_task_module("genlab.train"),
        hydra_errors.reworded(CONF_DIR),
    ):
        _train()  # its log: train.log
    if report.refused_jobs:  # never report another sweep's results as this one's
        names = ", ".join(report.refused_jobs[:5]) + (
            ", ..." if len(report.refused_jobs) > 5 else ""
        )
        print(
            f"Error: {len(report.refused_jobs)} job(s) of this sweep did not run ({names}): "
            f"their folders hold these jobs with other settings, or another command works in "
            f"them (the lines 'Job N refused' above say which). Sweep into a new folder: leave "
            f"hydra.sweep.dir at its default or name a new one.",
            file=sys.stderr,
        )
        raise SystemExit(1)


@contextlib.contextmanager
def _stops_reported() -> Iterator[None]:
    """A stop outside a run's own handling (before it starts, or one that ends it at once):
    a line on stderr and the shell's exit code, not a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print("Interrupted (Ctrl-C).", file=sys.stderr)
        raise SystemExit(130) from None
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        print(f"Interrupted ({name}) during {stop.phase}.", file=sys.stderr)
        raise SystemExit(exit_code(name)) from None


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
def _evaluate(cfg: DictConfig) -> None:
    from genlab.evaluate import evaluate

    with user_errors():
        evaluate(cfg)


def eval_command() -> None:
    """``genlab-eval``: a checkpoint's metrics on the test set."""
    with (
        _stops_reported(),
        sigterm_raises("evaluation"),
        private_api.hydra_task_module("genlab.evaluate"),
        hydra_errors.reworded(CONF_DIR),
    ):
        _evaluate()  # its log: evaluate.log


def report_command(argv: list[str] | None = None) -> None:
    """``genlab-report SWEEP_DIR``: (re)write a sweep's tables and figures."""
    parser = argparse.ArgumentParser(
        prog="genlab-report", description="Summarise a sweep: tables and figures in its folder."
    )
    parser.add_argument("sweep_dir", type=Path, help="the folder a multirun wrote")
    args = parser.parse_args(argv)
    from genlab.report import write_report

    with user_errors():
        for path in write_report(args.sweep_dir):
            print(path)
