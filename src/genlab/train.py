"""genlab-train: one training run (or a sweep with -m) from the Hydra config in conf/train.yaml.

config -> check -> seed -> data, model, logger, callbacks, trainer -> fit -> test [-> eval] -> metrics.json
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

from genlab import config, run, runtime, safety
from genlab.errors import GenlabError, TrainingDiverged, find_user_error, user_errors
from genlab.evaluate import evaluate_model

log = logging.getLogger(__name__)


def _quiet_third_party_noise() -> None:
    """Drop messages that say nothing about the run: an advert and a deprecation
    inside Lightning's own code that users cannot act on."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )


def _build_trainer(cfg: DictConfig, **objects: Any) -> pl.Trainer:
    if not cfg.trainer.get("plugins"):  # a user's own plugins replace the atomic checkpoint writer
        objects["plugins"] = [safety.AtomicCheckpointIO()]
    if not cfg.trainer.get("profiler"):  # ++trainer.profiler=simple (or advanced) profiles
        objects["profiler"] = runtime.QuietProfiler()
    try:
        return instantiate(cfg.trainer, **objects)
    except InstantiationException as err:
        if isinstance(err.__cause__, MisconfigurationException):  # Lightning's word on a setting
            raise GenlabError(f"Lightning refused the trainer settings: {err.__cause__}") from err
        raise


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
    run_config = OmegaConf.to_container(cfg, resolve=True)
    config.validate(run_config)
    output_dir = Path(cfg.paths.output_dir)
    checkpoint_dir = Path(cfg.paths.checkpoint_dir)
    ckpt_path = run.resume_checkpoint(cfg.resume, checkpoint_dir, run_config, output_dir)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    model.run_config = run_config
    config.check_training_setup(run_config, model)
    datamodule.prepare_data()  # missing or corrupt files stop the run here, before it writes

    runtime.fast_tensorboard_checksums()
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    if not cfg.trainer.get("enable_progress_bar", True):
        # Lightning refuses a progress-bar callback beside enable_progress_bar=false; the switch wins.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    stopper = safety.StopOnInterrupt(checkpoint_dir)
    callbacks += [safety.SeedEachEpoch(cfg.seed), stopper, safety.OneLogHistory()]
    trainer = _build_trainer(cfg, logger=logger, callbacks=callbacks)
    runtime.cache_cuda_check(trainer)
    if trainer.is_global_zero:  # the run is accepted: from here on it writes its directory
        run.record_run(output_dir, cfg)
    if logger:
        logger.log_hyperparams(run_config)

    try:
        with stopper.handling_ctrl_c():
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except TrainingDiverged as err:
        last = checkpoint_dir / run.LAST_CHECKPOINT
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

    tested, val_metrics = run.tested_weights(trainer)
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
    if cfg.eval.after_fit and trainer.is_global_zero:  # on the tested weights trainer.test left
        metrics.update(evaluate_model(model, cfg.data, cfg.eval, cfg.paths.cache_dir))
    if trainer.is_global_zero:
        run.write_metrics(output_dir / run.METRICS_FILE, metrics)
        log.info("Run directory: %s", output_dir.resolve())
    return metrics


def _stopped(
    trainer: pl.Trainer,
    output_dir: Path,
    checkpoint_dir: Path,
    start: float,
    status: str,
    message: str,
) -> dict[str, Any]:
    """metrics.json of a run that stopped before the end: where it got, and what to resume."""
    last = checkpoint_dir / run.LAST_CHECKPOINT
    metrics = {
        "status": status,
        "message": message,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "last_checkpoint": os.path.relpath(last, output_dir) if last.is_file() else None,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    if trainer.is_global_zero:
        run.write_metrics(output_dir / run.METRICS_FILE, metrics)
    return metrics


# Exit codes of runs that stopped early (metrics.json says which): 130 is the shell's code for Ctrl-C.
_EXIT_CODES = {"interrupted": 130, "diverged": 1}


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _refuse_local_ddp_sweep(cfg: DictConfig) -> None:
    """Lightning's DDP starts its other processes by re-running the command line,
    which inside a local multirun would re-run the whole sweep."""
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


@hydra.main(config_path=str(config.CONF_DIR), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One run (or one job of a sweep).

    Returns the metrics.json entry named by ``objective`` (for sweepers that
    optimise it, e.g. Optuna), NaN for a job that failed or does not report it.
    """
    _quiet_third_party_noise()
    log.info("torch CPU threads: %d", torch.get_num_threads())
    if not _in_sweep():
        with user_errors():
            metrics = train(cfg)
        if metrics["status"] in _EXIT_CODES:
            raise SystemExit(_EXIT_CODES[metrics["status"]])
        return _objective(cfg, metrics)
    with user_errors():
        _refuse_local_ddp_sweep(cfg)
    # One failing job must not end a sweep (Hydra stops at the first job that
    # raises): record the failure in the job's metrics.json and move on. A
    # diverged job has said so in its metrics.json; the others go on too.
    try:
        metrics = train(cfg)
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is not None:
            log.error("Job failed: %s", user_error)
        else:
            log.exception("Job failed")
        run.record_failure(Path(cfg.paths.output_dir), cfg, user_error or err)
        return _objective(cfg, {})
    if metrics["status"] == "interrupted":  # Ctrl-C stops the whole sweep
        raise SystemExit(_EXIT_CODES["interrupted"])
    return _objective(cfg, metrics)


def _objective(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    if cfg.get("objective") is None:
        return None
    return float(metrics.get(cfg.objective, math.nan))


def main() -> None:
    """Console entry point ``genlab-train``."""
    try:
        with config.hydra_errors_as_user_errors():
            _hydra_main()
    except KeyboardInterrupt:  # Ctrl-C outside training: nothing to save
        print("Interrupted.", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
