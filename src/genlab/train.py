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
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from genlab import runtime
from genlab.checkpoints import AtomicCheckpointIO
from genlab.config.validate import check_training_setup, validate
from genlab.errors import GenlabError, TrainingDiverged
from genlab.evaluate import evaluate_model
from genlab.interrupts import StopOnInterrupt
from genlab.resume import OneLogHistory, SeedEachEpoch, resume_checkpoint
from genlab.rundir import LAST_CHECKPOINT, METRICS_FILE, record_run, write_metrics

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one model as ``cfg`` describes; returns what metrics.json holds.

    Its ``status`` is ``completed``, ``diverged`` (a training loss became NaN
    or infinite: training stopped, the last checkpoint holds the last good
    weights) or ``interrupted`` (Ctrl-C or SIGTERM: a checkpoint was saved
    and ``resume=last`` continues). Anything that stops the run before
    training (a bad config, missing or corrupt data, a refused run directory)
    raises `GenlabError` and leaves the run directory as it was.
    """
    start = time.perf_counter()
    _quiet_third_party_noise()
    log.info("torch CPU threads: %d", torch.get_num_threads())
    run_config = OmegaConf.to_container(cfg, resolve=True)
    validate(run_config)
    output_dir = Path(cfg.paths.output_dir)
    checkpoint_dir = Path(cfg.paths.checkpoint_dir)
    ckpt_path = resume_checkpoint(cfg.resume, checkpoint_dir, run_config, output_dir)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    model.run_config = run_config
    check_training_setup(run_config, model)
    eval_options = instantiate(cfg.eval)
    datamodule.prepare_data()  # missing or corrupt files stop the run here, before it writes

    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    if not cfg.trainer.get("enable_progress_bar", True):
        # Lightning refuses a progress-bar callback beside enable_progress_bar=false; the switch wins.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    stopper = StopOnInterrupt(checkpoint_dir)
    callbacks += [SeedEachEpoch(cfg.seed), stopper, OneLogHistory()]
    trainer = _build_trainer(cfg, logger=logger, callbacks=callbacks)
    runtime.cache_cuda_check(trainer)
    if trainer.is_global_zero:  # the run is accepted: from here on it writes its directory
        record_run(output_dir, cfg)
    if logger:
        logger.log_hyperparams(run_config)

    try:
        with stopper.handling_ctrl_c():
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingDiverged as err:
        last = checkpoint_dir / LAST_CHECKPOINT
        kept = (
            f"{last} holds the last good weights"
            if last.is_file()
            else "no checkpoint had been saved yet"
        )
        message = (
            f"{err} The run stopped before saving anything from those weights; {kept}. Try a "
            f"lower model.optimizer.lr, or clip gradients with trainer.gradient_clip_val (AE, VAE)."
        )
        log.error("%s", message)
        return _stopped(trainer, output_dir, checkpoint_dir, start, "diverged", message)
    except SIGTERMException:  # Ctrl-C or SIGTERM; StopOnInterrupt saved a checkpoint
        pass
    if stopper.requested:
        message = "Training was stopped (Ctrl-C or SIGTERM); continue it with resume=last."
        log.warning(message)
        return _stopped(trainer, output_dir, checkpoint_dir, start, "interrupted", message)

    tested, val_metrics = _tested_weights(trainer)
    (test_metrics,) = trainer.test(model, datamodule=datamodule, ckpt_path=tested)

    metrics: dict[str, Any] = {
        "status": "completed",
        **val_metrics,
        **test_metrics,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "tested_checkpoint": os.path.relpath(tested, output_dir) if tested else "final weights",
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    if eval_options.after_fit and trainer.is_global_zero:  # on the weights trainer.test left
        metrics.update(evaluate_model(model, cfg.data, eval_options, cfg.paths.cache_dir))
    if trainer.is_global_zero:
        write_metrics(output_dir / METRICS_FILE, metrics)
        log.info("Run directory: %s", output_dir.resolve())
    return metrics


def _quiet_third_party_noise() -> None:
    """Drop messages that say nothing about the run: an advert and a deprecation
    inside Lightning's own code that users cannot act on."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )


def _build_trainer(cfg: DictConfig, **objects: Any) -> pl.Trainer:
    if not cfg.trainer.get("plugins"):  # a user's own plugins replace the atomic checkpoint writer
        objects["plugins"] = [AtomicCheckpointIO()]
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


def _stopped(
    trainer: pl.Trainer,
    output_dir: Path,
    checkpoint_dir: Path,
    start: float,
    status: str,
    message: str,
) -> dict[str, Any]:
    """metrics.json of a run that stopped before the end: where it got, and what to resume."""
    last = checkpoint_dir / LAST_CHECKPOINT
    metrics = {
        "status": status,
        "message": message,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "last_checkpoint": os.path.relpath(last, output_dir) if last.is_file() else None,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    if trainer.is_global_zero:
        write_metrics(output_dir / METRICS_FILE, metrics)
    return metrics
