"""The run directory: which checkpoint to resume or test, metrics.json, and
models rebuilt from a checkpoint alone.

Layout of a run directory::

    .hydra/            config.yaml, overrides.yaml, hydra.yaml (written by Hydra)
    tensorboard/       event files and hparams.yaml
    checkpoints/       last.ckpt and best-epochNNN.ckpt (the best by val/loss)
    metrics.json       test metrics (and validation numbers of the tested weights), after fit
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from genlab.errors import GenlabError
from genlab.models.base import CONFIG_KEY, GenerativeModel

LAST_CHECKPOINT = "last.ckpt"
METRICS_FILE = "metrics.json"


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
    resume: str | None, checkpoint_dir: Path, run_config: dict[str, Any]
) -> str | None:
    """The checkpoint that ``resume`` (null | last | a path) asks to continue from.

    A fresh run (``resume=null``) refuses a directory that already holds a
    ``last.ckpt``, so earlier work is never overwritten by accident; a resumed
    run must describe the same experiment as the checkpoint.
    """
    last = checkpoint_dir / LAST_CHECKPOINT
    if resume is None:
        if last.exists():
            raise GenlabError(
                f"{str(checkpoint_dir)!r} already holds checkpoints of an earlier run ({last.name}). "
                f"Continue that run with resume=last, or start a new one in another "
                f"directory (leave hydra.run.dir at its default or choose a new one)."
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
    saved = torch.load(path, map_location="cpu", weights_only=True).get(CONFIG_KEY)
    changes = _config_changes(saved, run_config) if saved is not None else []
    if changes:
        raise GenlabError(
            f"resume={resume} would continue {str(path)!r} as a different experiment: "
            f"{'; '.join(changes)}. Repeat the run's own overrides (its .hydra/overrides.yaml) "
            f"when resuming; only paths, trainer, callbacks and logger settings may change."
        )
    return str(path)


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
    best = getattr(callback, "best_model_path", "") if callback is not None else ""
    if best:
        return best, {callback.monitor: float(callback.best_model_score)}
    final_val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return None, final_val


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics`` as JSON atomically: a reader never sees half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_model(ckpt_path: str | os.PathLike, map_location: str = "cpu") -> GenerativeModel:
    """Rebuild a trained model from a genlab checkpoint (its run config travels inside it)."""
    try:
        checkpoint = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise GenlabError(
            # torch's own message suggests weights_only=False, which genlab never needs.
            f"{str(ckpt_path)!r} could not be read as a PyTorch checkpoint ({type(err).__name__})."
            f" Pass a .ckpt file written by genlab-train, e.g. <run dir>/checkpoints/last.ckpt."
        ) from err
    if not isinstance(checkpoint, dict) or CONFIG_KEY not in checkpoint:
        raise GenlabError(
            f"{str(ckpt_path)!r} is not a genlab checkpoint (it holds no run config). Pass a "
            f".ckpt file written by genlab-train, e.g. <run dir>/checkpoints/last.ckpt."
        )
    model = instantiate(OmegaConf.create(checkpoint[CONFIG_KEY]).model)
    model.load_state_dict(checkpoint["state_dict"])
    model.run_config = checkpoint[CONFIG_KEY]
    return model.eval()
