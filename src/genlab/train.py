"""genlab-train: one training run (or a sweep with -m) from the Hydra config in conf/train.yaml.

config -> seed -> data, model, logger, callbacks, trainer -> fit -> test -> metrics.json
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.plugins.environments import SLURMEnvironment

from genlab import run
from genlab.config import CONF_DIR
from genlab.errors import GenlabError, find_user_error, user_errors

log = logging.getLogger(__name__)


def _quiet_third_party_noise() -> None:
    """Drop messages that say nothing about the run: an advert and a deprecation
    inside Lightning's own code that users cannot act on."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one model as ``cfg`` describes; returns what metrics.json holds."""
    start = time.perf_counter()
    run_config = OmegaConf.to_container(cfg, resolve=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = run.resume_checkpoint(cfg.resume, Path(cfg.paths.checkpoint_dir), run_config)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    model.run_config = run_config
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    if not cfg.trainer.get("enable_progress_bar", True):
        # Lightning refuses a progress-bar callback beside enable_progress_bar=false; the switch wins.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    if logger:
        logger.log_hyperparams(run_config)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
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
    if trainer.is_global_zero:
        run.write_metrics(output_dir / run.METRICS_FILE, metrics)
        log.info("Run directory: %s", output_dir.resolve())
    return metrics


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


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Console entry point ``genlab-train``.

    Returns the metrics.json entry named by ``objective`` (for sweepers that
    optimise it, e.g. Optuna), NaN for a job that failed or does not report it.
    """
    _quiet_third_party_noise()
    log.info("torch CPU threads: %d", torch.get_num_threads())
    if not _in_sweep():
        with user_errors():
            metrics = train(cfg)
        return _objective(cfg, metrics)
    with user_errors():
        _refuse_local_ddp_sweep(cfg)
    # One failing job must not end a sweep (Hydra stops at the first job that
    # raises): record the failure in the job's metrics.json and move on.
    try:
        metrics = train(cfg)
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is not None:
            log.error("Job failed: %s", user_error)
        else:
            log.exception("Job failed")
        run.record_failure(Path(cfg.paths.output_dir), user_error or err)
        metrics = {}
    return _objective(cfg, metrics)


def _objective(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    if cfg.get("objective") is None:
        return None
    return float(metrics.get(cfg.objective, math.nan))


if __name__ == "__main__":
    main()
