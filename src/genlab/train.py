"""genlab-train's work: one training run, as its config describes it.

config -> check -> seed -> data, model, logger, callbacks, trainer -> fit -> test [-> eval] -> metrics.json
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from genlab import runtime
from genlab.checkpoints import AtomicCheckpointIO, check_resumable
from genlab.config.validate import check_training_setup, resolved, validate
from genlab.disk import disk_errors
from genlab.errors import GenlabError, Interrupted, TrainingDiverged
from genlab.evaluate import evaluate_model
from genlab.interrupts import StopSignals
from genlab.resume import OneLogHistory, SeedEachEpoch, resume_checkpoint
from genlab.rundir import (
    LAST_CHECKPOINT,
    METRICS_FILE,
    is_rank_zero,
    owned,
    record_run,
    write_metrics,
)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one model as ``cfg`` describes; returns what metrics.json holds.

    Its ``status`` is ``completed``, ``diverged`` (a training loss became NaN
    or infinite: training stopped, the last checkpoint holds the last good
    weights) or ``interrupted`` (Ctrl-C or SIGTERM, in the ``phase`` it names:
    ``resume=last`` continues; see `genlab.interrupts`). Anything that stops the
    run before it is accepted (a bad config, missing or corrupt data, a run
    directory in use or holding another run) raises `GenlabError` and leaves
    the run directory as it was; so does a stop (`Interrupted`) then.
    """
    start = time.perf_counter()
    _quiet_third_party_noise()
    output_dir = Path(cfg.paths.output_dir)
    stopper = StopSignals(cfg.paths.checkpoint_dir)

    def record(message: str) -> None:  # only once the run is accepted: it then owns the directory
        if stopper.phase != "set-up" and is_rank_zero():
            write_metrics(output_dir / METRICS_FILE, {"status": "failed", "error": message})

    with (
        stopper.installed(),
        disk_errors(output_dir, record),
        owned(output_dir, enabled=is_rank_zero()),
    ):
        return _run(cfg, stopper, start)


def _run(cfg: DictConfig, stopper: StopSignals, start: float) -> dict[str, Any]:
    run_config = resolved(
        cfg, ("model", "data", "trainer", "paths", "eval", "seed"), "genlab-train"
    )
    validate(run_config)
    output_dir = Path(cfg.paths.output_dir)
    checkpoint_dir = Path(cfg.paths.checkpoint_dir)
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise GenlabError(
            f"paths.checkpoint_dir={str(checkpoint_dir)!r} is not a folder (a file of that name "
            f"exists); point it at a folder, or leave it at its default <run dir>/checkpoints."
        )
    resumed = resume_checkpoint(cfg.resume, checkpoint_dir, run_config, output_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    model.run_config = run_config
    check_training_setup(run_config, model)
    ckpt_path = None
    if resumed is not None:
        ckpt_path, checkpoint = resumed
        check_resumable(checkpoint, model, ckpt_path)
        del checkpoint, resumed  # Lightning reads the file again; not kept twice in memory
    eval_options = instantiate(cfg.eval)
    datamodule.prepare_data()  # missing or corrupt files stop the run here, before it writes

    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    if not cfg.trainer.get("enable_progress_bar", True):
        # Lightning refuses a progress-bar callback beside enable_progress_bar=false; the switch wins.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks += [SeedEachEpoch(cfg.seed), stopper, OneLogHistory()]
    trainer = _build_trainer(cfg, logger=logger, callbacks=callbacks)
    runtime.cache_cuda_check(trainer)
    stopper.trainer = trainer

    # The run is accepted: from here on it writes its directory, and a stop is recorded.
    stopper.phase = "training"
    if trainer.is_global_zero:
        record_run(output_dir, cfg)
        if ckpt_path is not None:  # the earlier attempt's record; this attempt writes its own
            (output_dir / METRICS_FILE).unlink(missing_ok=True)
    log.info(
        "Run directory: %s (watch it with: tensorboard --logdir %s). Seed %d; torch CPU "
        "threads: %d.",
        output_dir.resolve(),
        output_dir.resolve(),
        cfg.seed,
        torch.get_num_threads(),
    )
    if logger:
        logger.log_hyperparams(run_config)
    try:
        return _fit_and_test(
            cfg, trainer, model, datamodule, eval_options, ckpt_path, stopper, start
        )
    except TrainingDiverged as err:
        stopper.phase = "stopping"
        return record_diverged(trainer, cfg, str(err), start)
    except (Interrupted, SIGTERMException) as stop:
        at_once = isinstance(stop, Interrupted)
        stopped_in, stopper.phase = stopper.stopped_in or stopper.phase, "stopping"
        return record_interrupted(trainer, cfg, stopper, stopped_in, start, at_once=at_once)


def _fit_and_test(
    cfg: DictConfig,
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    eval_options: Any,
    ckpt_path: str | None,
    stopper: StopSignals,
    start: float,
) -> dict[str, Any]:
    output_dir = Path(cfg.paths.output_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    stopper.phase = "test"  # first: from here on a signal stops at once
    if stopper.signum is not None:  # after the loop's last look; last.ckpt was saved at its end
        raise SIGTERMException

    tested, val_metrics = _tested_weights(trainer)
    # verbose=False: the summary below prints the test metrics, rounded.
    (test_metrics,) = trainer.test(model, datamodule=datamodule, ckpt_path=tested, verbose=False)

    metrics: dict[str, Any] = {
        "status": "completed",
        **val_metrics,
        **test_metrics,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "tested_checkpoint": os.path.relpath(tested, output_dir) if tested else "final weights",
    }
    stopper.phase = "evaluation"
    if eval_options.after_fit and trainer.is_global_zero:  # on the weights trainer.test left
        metrics.update(evaluate_model(model, cfg.data, eval_options, cfg.paths.cache_dir))
    stopper.phase = "writing results"
    metrics["wall_time_s"] = round(time.perf_counter() - start, 2)
    if trainer.is_global_zero:
        write_metrics(output_dir / METRICS_FILE, metrics)
    stopper.phase = "done"
    if trainer.is_global_zero:
        numbers = ", ".join(
            f"{k} {v:.4g}"
            for k, v in metrics.items()
            if k.startswith("test/") and isinstance(v, int | float)
        )
        log.info(
            "Completed in %.0f s: %s. Results: %s; pictures: %s.",
            metrics["wall_time_s"],
            numbers,
            (output_dir / METRICS_FILE).resolve(),
            (output_dir / "images").resolve(),
        )
    return metrics


# Lightning's messages that say nothing about the run: an advert, and accelerators this
# machine does not have (a GPU that is there and used is still announced).
_NOISE = ("litlogger", "TPU available:", "HPU available:", "GPU available: False")


def _says_something(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(noise in message for noise in _NOISE)


def _quiet_third_party_noise() -> None:
    """Drop messages that say nothing about the run (`_NOISE`), a deprecation inside
    Lightning's own code that users cannot act on, and the warning that an epoch is shorter
    than trainer.log_every_n_steps: short jobs meet it by design, and their per-epoch
    metrics are logged whatever the interval."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller")
    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _says_something not in lightning.filters:  # once per process, not once per sweep job
        lightning.addFilter(_says_something)


def _build_trainer(cfg: DictConfig, **objects: Any) -> pl.Trainer:
    if not cfg.trainer.get("plugins"):  # a user's own plugins replace the atomic checkpoint writer
        objects.setdefault("plugins", [AtomicCheckpointIO()])
    try:
        return instantiate(cfg.trainer, **objects)
    except InstantiationException as err:
        if isinstance(err.__cause__, MisconfigurationException):  # Lightning's word on a setting
            raise GenlabError(f"Lightning refused the trainer settings: {err.__cause__}") from err
        raise


def _tested_weights(trainer: pl.Trainer) -> tuple[str | None, dict[str, float]]:
    """Which weights to test: the best checkpoint by the monitored metric when one was
    ranked, else the final weights (None); with the validation numbers of exactly those."""
    callback = trainer.checkpoint_callback
    # Without callbacks.model_checkpoint, Lightning's own checkpoint callback ranks nothing.
    score = getattr(callback, "best_model_score", None)
    if score is not None and callback.best_model_path:
        return callback.best_model_path, {callback.monitor: float(score)}
    final_val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return None, final_val


def record_diverged(
    trainer: pl.Trainer, cfg: DictConfig, reason: str, start: float
) -> dict[str, Any]:
    """metrics.json of a run whose training diverged (``reason`` says where), saying which
    checkpoint holds its last good weights."""
    last = Path(cfg.paths.checkpoint_dir) / LAST_CHECKPOINT
    kept = (
        f"{last} holds the last good weights"
        if last.is_file()
        else "no checkpoint had been saved yet"
    )
    message = (
        f"{reason} The run stopped before saving anything from those weights; {kept}. Try a "
        f"lower model.optimizer.lr, or clip gradients with trainer.gradient_clip_val (AE, VAE)."
    )
    log.error("%s", message)
    return _stopped(trainer, cfg, start, {"status": "diverged", "message": message})


def record_interrupted(
    trainer: pl.Trainer,
    cfg: DictConfig,
    stopper: StopSignals,
    phase: str,
    start: float,
    at_once: bool,
) -> dict[str, Any]:
    """metrics.json of a run stopped by Ctrl-C or SIGTERM, saying in which phase, and how
    to continue."""
    name = stopper.signal_name or "SIGTERM"
    last = Path(cfg.paths.checkpoint_dir) / LAST_CHECKPOINT
    if not last.is_file():
        advice = (
            "No last.ckpt had been saved (callbacks.last_checkpoint is off, or the stop came "
            "first): start the run again in a new directory."
        )
    elif phase in ("training", "validation") and not at_once:
        advice = f"{last} holds the training state at the stop; continue with resume=last."
    elif phase in ("training", "validation"):
        advice = (
            f"It stopped at once, saving nothing; resume=last continues from {last}, saved "
            f"before the stop."
        )
    else:
        advice = (
            f"Training had finished and {last} holds its final state: resume=last repeats the "
            f"test pass (and the evaluation) without training."
        )
    message = f"The run was stopped ({name}) during {phase}. {advice}"
    log.warning(message)
    return _stopped(
        trainer,
        cfg,
        start,
        {"status": "interrupted", "phase": phase, "signal": name, "message": message},
    )


def _stopped(
    trainer: pl.Trainer, cfg: DictConfig, start: float, outcome: dict[str, Any]
) -> dict[str, Any]:
    """metrics.json of a run that stopped before the end: where it got, and what to resume."""
    output_dir = Path(cfg.paths.output_dir)
    last = Path(cfg.paths.checkpoint_dir) / LAST_CHECKPOINT
    metrics = {
        **outcome,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "last_checkpoint": os.path.relpath(last, output_dir) if last.is_file() else None,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    if trainer.is_global_zero:
        write_metrics(output_dir / METRICS_FILE, metrics)
    return metrics
