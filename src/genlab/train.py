"""genlab-train: one training run (or a sweep with -m) from the Hydra config in conf/train.yaml.

config -> seed -> data, model, logger, callbacks, trainer -> fit -> test [-> eval] -> metrics.json
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar

from genlab import run
from genlab.config import CONF_DIR
from genlab.errors import user_errors
from genlab.evaluate import evaluate_model

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
    if cfg.eval.after_fit:  # on the tested weights, which trainer.test left in the model
        metrics.update(evaluate_model(model, cfg.data, cfg.eval, cfg.paths.cache_dir))
    if trainer.is_global_zero:
        run.write_metrics(output_dir / run.METRICS_FILE, metrics)
        log.info("Run directory: %s", output_dir.resolve())
    return metrics


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Console entry point ``genlab-train``."""
    _quiet_third_party_noise()
    with user_errors():
        train(cfg)


if __name__ == "__main__":
    main()
