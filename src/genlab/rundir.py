"""The run directory: what its files are called, and the records that make a run
reproducible and say how it ended.

Layout of a run directory::

    .hydra/            config.yaml, overrides.yaml, hydra.yaml (written once the run is accepted)
    environment.json   package versions, Python, device and git commit of the run
    train.log          the console log
    tensorboard/       event files and hparams.yaml
    checkpoints/       last.ckpt and best-epochNNN.ckpt (the best by val/loss)
    images/            the pictures, per epoch and final
    metrics.json       status; test metrics (and validation numbers of the tested weights) after fit
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from genlab.atomic import write_atomically
from genlab.errors import GenlabError

LAST_CHECKPOINT = "last.ckpt"
METRICS_FILE = "metrics.json"
CONFIG_DIR = ".hydra"
ENVIRONMENT_FILE = "environment.json"
# Distributions whose versions decide a run's numbers, recorded in environment.json.
_PACKAGES = (
    "genlab",
    "torch",
    "torchvision",
    "pytorch-lightning",
    "hydra-core",
    "omegaconf",
    "numpy",
    "tensorboard",
)


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics`` (metrics.json) as JSON, whole or not at all."""
    write_atomically(path, _json(metrics))


def record_run(output_dir: Path, cfg: DictConfig) -> None:
    """Write what reproduces the run: ``.hydra/`` (config, and overrides and Hydra's
    settings when run by Hydra) and ``environment.json``.

    Hydra's own writing of ``.hydra/`` is switched off (``hydra.output_subdir:
    null``) so that a run genlab refuses leaves an earlier run's files untouched.
    """
    config_dir = output_dir / CONFIG_DIR
    write_atomically(config_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        write_atomically(config_dir / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))
        write_atomically(
            config_dir / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg}))
        )
    write_atomically(output_dir / ENVIRONMENT_FILE, _json(environment()))


def environment() -> dict[str, Any]:
    """Package versions, Python, platform, device and the git commit of genlab's source."""
    import torch  # here, not at the top: reading a run directory needs no torch

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "command": sys.argv,
        **_git_state(),
    }


def _git_state() -> dict[str, Any]:
    """The commit genlab's source is at, and whether it has uncommitted changes (when in git)."""
    source = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(source), *args],
                check=False,
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:  # an installed wheel, or no git on this machine
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(git("status", "--porcelain", "-uno"))}


def record_failure(output_dir: Path, cfg: DictConfig, err: BaseException) -> None:
    """Say in the run's metrics.json that it failed and why, unless the run wrote one
    itself; with its config, when it failed before recording it (see `record_run`)."""
    path = output_dir / METRICS_FILE
    if path.exists():
        return
    if not (output_dir / CONFIG_DIR).exists():
        record_run(output_dir, cfg)
    message = str(err) if isinstance(err, GenlabError) else f"{type(err).__name__}: {err}"
    write_metrics(path, {"status": "failed", "error": " ".join(message.split())})
