"""The run directory: which checkpoint to resume or test, metrics.json, and
models rebuilt from a checkpoint alone.

Layout of a run directory::

    .hydra/            config.yaml, overrides.yaml, hydra.yaml (written once the run is accepted)
    environment.json   package versions, Python, device and git commit of the run
    tensorboard/       event files and hparams.yaml
    checkpoints/       last.ckpt and best-epochNNN.ckpt (the best by val/loss)
    metrics.json       status; test metrics (and validation numbers of the tested weights) after fit
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from genlab.errors import GenlabError
from genlab.models.base import CONFIG_KEY, GenerativeModel

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


# Options that may differ when a run is continued: where things live, how long
# and on what it trains. Any other change means the checkpoint belongs to
# another experiment (the optimiser state in it would even override a new lr).
_FREE_ON_RESUME = (
    "resume",
    "paths.",
    "trainer.",
    "callbacks.",
    "logger.",
    "eval.",
    "data.data_dir",
    "data.download",
    "data.eval_batch_size",
)


def resume_checkpoint(
    resume: str | None,
    checkpoint_dir: Path,
    run_config: dict[str, Any],
    output_dir: Path | None = None,
) -> str | None:
    """The checkpoint that ``resume`` (null | last | a path) asks to continue from.

    A fresh run (``resume=null``) refuses a directory that already holds
    checkpoints (or, given ``output_dir``, the metrics.json of an earlier run),
    so earlier work is never overwritten by accident; a resumed run must
    describe the same experiment as the checkpoint.
    """
    last = checkpoint_dir / LAST_CHECKPOINT
    if resume is None:
        earlier = sorted(p.name for p in checkpoint_dir.glob("*.ckpt"))
        if output_dir is not None and (output_dir / METRICS_FILE).exists():
            earlier.append(METRICS_FILE)
        if earlier:
            raise GenlabError(
                f"{str(output_dir or checkpoint_dir)!r} already holds the results of an earlier run "
                f"({', '.join(earlier)}). Continue that run with resume=last, or start a new one "
                f"in another directory (leave hydra.run.dir at its default or choose a new one)."
            )
        return None
    if resume == "last":
        if not last.is_file():
            raise GenlabError(
                f"resume=last found no checkpoint at {str(last)!r}. Pass the run's directory with "
                f"hydra.run.dir=<run dir> (and the run's overrides), or resume=<path to a .ckpt>."
            )
        path = last
    else:
        path = Path(resume)
        if not path.is_file():
            raise GenlabError(
                f"resume={resume!r} is not a checkpoint file. Use resume=null (a fresh run), "
                f"resume=last (this run directory's {LAST_CHECKPOINT}) or a path to a .ckpt file."
            )
    saved = _read_checkpoint(path, f"resume={resume}").get(CONFIG_KEY)
    changes = _config_changes(saved, run_config) if saved is not None else []
    if changes:
        raise GenlabError(
            f"resume={resume} would continue {str(path)!r} as a different experiment: "
            f"{'; '.join(changes)}. Repeat the run's own overrides (its .hydra/overrides.yaml) "
            f"when resuming; only paths, trainer, callbacks and logger settings may change."
        )
    return str(path)


def _read_checkpoint(
    path: str | os.PathLike, option: str, map_location: str = "cpu"
) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holding arbitrary objects
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in reason:  # torch's advice to unpickle arbitrary code: never needed here
            reason = f"{type(err).__name__}: not a file of tensors and plain data"
        raise GenlabError(
            f"{option}: {str(path)!r} is not a readable checkpoint ({reason}). Point it at a .ckpt "
            f"file that genlab-train wrote."
        ) from err
    if not isinstance(checkpoint, dict):
        raise GenlabError(f"{option}: {str(path)!r} is not a checkpoint that genlab-train wrote.")
    return checkpoint


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (``model.net.activation``)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every option that differs, except those free on resume."""
    before, after = _flatten(saved), _flatten(now)
    return [
        f"{key} was {before.get(key, '<unset>')!r}, now {after.get(key, '<unset>')!r}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key) and not key.startswith(_FREE_ON_RESUME)
    ]


def tested_weights(trainer: pl.Trainer) -> tuple[str | None, dict[str, float]]:
    """Which weights to test: the best checkpoint by the monitored metric when
    one was ranked, else the final weights (None); with the validation numbers
    known for exactly those weights."""
    callback = trainer.checkpoint_callback
    # Without callbacks.model_checkpoint, Lightning's own checkpoint callback ranks nothing.
    score = getattr(callback, "best_model_score", None)
    if score is not None and callback.best_model_path:
        return callback.best_model_path, {callback.monitor: float(score)}
    final_val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return None, final_val


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics`` as JSON atomically: a reader never sees half a file."""
    _write_atomically(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_run(output_dir: Path, cfg: DictConfig) -> None:
    """Write what reproduces the run: ``.hydra/`` (config, and overrides and Hydra's
    settings when run by Hydra) and ``environment.json``.

    Hydra's own writing of ``.hydra/`` is switched off (``hydra.output_subdir:
    null``) so that a run genlab refuses leaves an earlier run's files untouched.
    """
    config_dir = output_dir / CONFIG_DIR
    _write_atomically(config_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        _write_atomically(
            config_dir / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task)
        )
        _write_atomically(
            config_dir / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg}))
        )
    _write_atomically(
        output_dir / ENVIRONMENT_FILE, json.dumps(environment(), indent=2, sort_keys=True) + "\n"
    )


def environment() -> dict[str, Any]:
    """Package versions, Python, platform, device and the git commit of genlab's source."""
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


def load_model(ckpt_path: str | os.PathLike, map_location: str = "cpu") -> GenerativeModel:
    """Rebuild a trained model from a genlab checkpoint (its run config travels inside it)."""
    checkpoint = _read_checkpoint(ckpt_path, "ckpt_path", map_location)
    if CONFIG_KEY not in checkpoint:
        raise GenlabError(
            f"{str(ckpt_path)!r} is not a genlab checkpoint (it holds no run config). Pass a "
            f".ckpt file written by genlab-train, e.g. <run dir>/checkpoints/last.ckpt."
        )
    model = instantiate(OmegaConf.create(checkpoint[CONFIG_KEY]).model)
    model.load_state_dict(checkpoint["state_dict"])
    model.run_config = checkpoint[CONFIG_KEY]
    return model.eval()
