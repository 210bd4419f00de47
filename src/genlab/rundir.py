"""The run directory: what its files are called, and the records that make a run
reproducible and say how it ended.

Layout of a run directory::

    .hydra/            config.yaml, overrides.yaml, hydra.yaml (written once the run is accepted)
    environment.json   package versions, Python, device and git commit of the run
    train.log          the console log
    tensorboard/       event files and hparams.yaml
    checkpoints/       last.ckpt and best-epochNNN.ckpt (the best by val/loss)
    images/            the pictures, per epoch and final; latent_final.npz, the final latent
                       scatter's points
    metrics.json       status; test metrics (and validation numbers of the tested weights) after fit
    .genlab.lock       while a genlab command works in the directory (see `owned`)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from genlab.atomic import write_atomically
from genlab.errors import FolderTaken, GenlabError

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
METRICS_FILE = "metrics.json"
CONFIG_DIR = ".hydra"
ENVIRONMENT_FILE = "environment.json"
LOCK_FILE = ".genlab.lock"
# In images/: the points of the final latent scatter (see genlab.visuals.latent_points).
LATENT_POINTS_FILE = "latent_final.npz"
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


@contextlib.contextmanager
def owned(output_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``output_dir`` for this process while the block runs: another genlab command
    into the same folder meanwhile is refused with a `GenlabError`.

    The hold is an operating-system lock (``flock``) on ``.genlab.lock``, so a
    process that dies, even by ``kill -9``, releases it. A folder that was empty
    before and is empty after (a refused run) is removed again. ``enabled=False``
    (the other processes of a DDP run) holds nothing.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the folder is not guarded
        fcntl = None  # type: ignore[assignment]
    if not enabled or fcntl is None:
        yield
        return
    was_empty = not output_dir.exists() or not any(output_dir.iterdir())
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    fd = _lock(path, fcntl)
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # while still locked, so nobody else holds this file
            os.close(fd)
        with contextlib.suppress(OSError):
            if was_empty and not any(output_dir.iterdir()):
                output_dir.rmdir()


def _lock(path: Path, fcntl: Any) -> int | None:
    """An open descriptor of ``path`` holding its flock, with this process's command line
    in it; None where the file system has no flock (some cluster file systems, Lustre
    without its flock option, some FUSE and old NFS mounts), with a warning."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderTaken(
                f"{str(path.parent)!r} is in use by another genlab command (process {holder}). "
                f"Two runs in one directory would overwrite each other's checkpoints and "
                f"results: wait for it to end, or choose another hydra.run.dir."
            ) from None
        except OSError as err:
            os.close(fd)
            path.unlink(missing_ok=True)
            log.warning(
                "The file system of %s does not support file locks (%s): two commands into "
                "this folder at once would not be refused.",
                path.parent,
                err.strerror,
            )
            return None
        try:  # the previous holder removes the file when it ends: lock the file that is there
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}: {' '.join(sys.argv)}".encode())
    return fd


def is_rank_zero() -> bool:
    """Whether this process is the first of its run (DDP starts several, SLURM one per
    task), judged from the environment as Lightning does, before any trainer exists."""
    ranks = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK")
    return all(os.environ.get(name, "0") in ("", "0") for name in ranks)


def record_run(output_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig | None = None) -> None:
    """Write what reproduces the run: ``.hydra/`` (config, and overrides and Hydra's
    settings when run by Hydra: ``hydra_cfg``, by default the current job's) and
    ``environment.json``.

    Hydra's own writing of ``.hydra/`` is switched off (``hydra.output_subdir:
    null``) so that a run genlab refuses leaves an earlier run's files untouched.
    """
    config_dir = output_dir / CONFIG_DIR
    write_atomically(config_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    if hydra_cfg is None and HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
    if hydra_cfg is not None:
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
    itself; with its config, when it failed before recording it (see `record_run`). Nothing
    is written into a folder another genlab command is working in."""
    path = output_dir / METRICS_FILE
    try:
        with owned(output_dir):
            if path.exists():
                return
            if not (output_dir / CONFIG_DIR).exists():
                record_run(output_dir, cfg)
            message = str(err) if isinstance(err, GenlabError) else f"{type(err).__name__}: {err}"
            write_metrics(path, {"status": "failed", "error": " ".join(message.split())})
    except GenlabError:  # the folder is in use: its owner reports for it
        return
