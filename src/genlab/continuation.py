"""A sweep continues where it stopped when its command is run again into its folder.

What a job does depends on what its folder holds (``plan_job``):

    the job with other settings (.hydra/config.yaml)       refused, naming the differing keys
    metrics.json says completed or diverged                reuse: nothing runs, no file changes
    checkpoints/last.ckpt, no finished metrics.json        resume from it (interrupted, killed, failed)
    a failed or stopped attempt with no last.ckpt          its records are removed; run again
    nothing of a run                                       run

Each job's decision is appended to ``<sweep dir>/attempts.jsonl``, which the sweep
report reads to say which jobs were reused, resumed and run.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from genlab.config.compare import config_changes
from genlab.errors import FolderTaken, GenlabError
from genlab.rundir import CONFIG_DIR, LAST_CHECKPOINT, METRICS_FILE, is_rank_zero, owned

ATTEMPTS_FILE = "attempts.jsonl"
# Statuses of a job that ran to its end; running it again would repeat it exactly.
FINISHED = ("completed", "diverged")
# Keys that may differ between the stored config of a finished job and its rerun.
_FREE = ("resume",)


@dataclass(frozen=True)
class Plan:
    """What a job of a rerun sweep does: ``run``, ``resume`` or ``reuse`` (``metrics``: what
    it reported)."""

    action: str
    metrics: dict[str, Any] | None = None


def plan_job(cfg: DictConfig) -> Plan:
    """What the job ``cfg`` describes does, given what its folder holds (see the module)."""
    output_dir = Path(cfg.paths.output_dir)
    metrics_file = output_dir / METRICS_FILE
    metrics: dict[str, Any] = {}
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise GenlabError(
                f"{str(metrics_file)!r} cannot be read ({err}), so whether this job finished is "
                f"unknown. Delete that file to run the job again (resuming its last.ckpt if any)."
            ) from err
        if not isinstance(metrics, dict):
            raise GenlabError(f"{str(metrics_file)!r} is not a metrics.json genlab wrote.")
    stored = output_dir / CONFIG_DIR / "config.yaml"
    changes = _differences(stored, cfg) if stored.is_file() else []
    if changes:
        raise FolderTaken(
            f"{str(output_dir)!r} holds this job with other settings: {'; '.join(changes)}. "
            f"Rerun the sweep's own command to continue it, or sweep into a new folder (leave "
            f"hydra.sweep.dir at its default)."
        )
    if metrics.get("status") in FINISHED:
        return Plan("reuse", metrics)
    checkpoint_dir = Path(cfg.paths.checkpoint_dir)
    if (checkpoint_dir / LAST_CHECKPOINT).is_file():
        return Plan("resume")
    leftovers = [metrics_file] if metrics else []
    leftovers += sorted(checkpoint_dir.glob("*.ckpt"))
    if leftovers and is_rank_zero():
        # A failed or stopped attempt that left nothing to resume from: its records go, so
        # that the job starts again; never while another process works in the folder.
        with owned(output_dir):
            for path in leftovers:
                path.unlink(missing_ok=True)
    return Plan("run")


def _differences(stored_file: Path, cfg: DictConfig) -> list[str]:
    """``key was old, now new`` for each option of the stored job config that differs from
    ``cfg`` (both as composed, interpolations unresolved)."""
    try:
        stored = OmegaConf.to_container(OmegaConf.load(stored_file), resolve=False)
    except Exception as err:  # missing or damaged: the job's settings cannot be compared
        raise GenlabError(
            f"{str(stored_file)!r} cannot be read ({err}), so whether this finished job has the "
            f"sweep's settings is unknown; sweep into a new folder."
        ) from err
    return config_changes(stored, OmegaConf.to_container(cfg, resolve=False), _FREE)


def record_attempt(sweep_dir: Path, job: str, action: str) -> None:
    """Append this job's decision to the sweep's attempts file (one line, written in one
    call, so the jobs of parallel launchers do not mix their lines)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"job": job, "action": action, "time": round(time.time(), 3)}) + "\n"
    fd = os.open(sweep_dir / ATTEMPTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def last_attempts(
    sweep_dir: Path, since: float | None = None, until: float | None = None
) -> dict[str, str]:
    """The latest decision for each job (by job folder name), optionally only those made
    between ``since`` and ``until`` (``time.time()`` values)."""
    path = sweep_dir / ATTEMPTS_FILE
    if not path.is_file():
        return {}
    latest: dict[str, str] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            if (since is None or entry["time"] >= since) and (
                until is None or entry["time"] < until
            ):
                latest[str(entry["job"])] = str(entry["action"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return latest


def objective(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    """What a sweep job returns to its sweeper: the metrics.json entry ``cfg.objective``
    names (for sweepers that optimise it, e.g. Optuna), NaN for a job that failed or does
    not report it; None when nothing is optimised."""
    if cfg.get("objective") is None:
        return None
    return float(metrics.get(cfg.objective, math.nan))
