"""A sweep killed mid-job continues when its command is run again: finished jobs are
reused untouched, the stopped one resumes from its checkpoint, and every job ends as in
an uninterrupted sweep; a sweep with other settings is refused per job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from commands import command_env, command_path, run_commands
from genlab.continuation import last_attempts, plan_job

# Four jobs of two short epochs; last.ckpt after every step, so a kill lands mid-epoch.
SWEEP = [
    "-m",
    "model.latent_dim=2,3",
    "model.beta=1,2",
    "trainer.max_epochs=2",
    "++trainer.limit_train_batches=4",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "callbacks.images.latent_points=300",
    "callbacks.images.projector_points=0",
]
JOBS = ["0", "1", "2", "3"]


def split_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "/" in k}


def stamps(job: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of a job's metrics.json and checkpoints."""
    files = [job / "metrics.json", *sorted((job / "checkpoints").glob("*.ckpt"))]
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}


@pytest.fixture(scope="module")
def continued(data_dir, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("continuation")
    killed_dir, straight_dir = folder / "killed", folder / "straight"
    # The whole process group of the sweep killed while job 2 is in its first epoch.
    sweep = subprocess.Popen(
        [command_path("genlab-train"), *SWEEP, f"hydra.sweep.dir={killed_dir}"],
        cwd=folder,
        env=command_env(data_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (killed_dir / "2" / "checkpoints" / "last.ckpt").exists():
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.stderr.read()
        time.sleep(0.005)
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    before = {job: stamps(killed_dir / job) for job in ("0", "1")}
    assert not (killed_dir / "2" / "metrics.json").exists()

    again = {
        "args": [*SWEEP, f"hydra.sweep.dir={killed_dir}"],
        "read": str(killed_dir / "summary.md"),
    }
    changed = {"args": [*SWEEP, "model.kl_warmup_epochs=1", f"hydra.sweep.dir={killed_dir}"]}
    cases = [{"args": [*SWEEP, f"hydra.sweep.dir={straight_dir}"]}, again, again, changed]
    started = []
    results = []
    for case in cases:  # one at a time, to time each and read the attempts it made
        started.append(time.time())
        results += run_commands("genlab-train", [case], data_dir, folder)
    return {
        "folder": folder,
        "before": before,
        "results": dict(zip(["straight", "continue", "finished", "changed"], results, strict=True)),
        "started": dict(zip(["straight", "continue", "finished", "changed"], started, strict=True)),
    }


def window(continued: dict, name: str) -> tuple[float, float | None]:
    """From the start of command ``name`` to the start of the next."""
    starts = list(continued["started"].values())
    i = list(continued["started"]).index(name)
    return starts[i], starts[i + 1] if i + 1 < len(starts) else None


def test_rerunning_a_killed_sweep_finishes_it_exactly(continued):
    folder, results = continued["folder"], continued["results"]
    assert results["continue"]["code"] == 0, results["continue"]["stderr"][-3000:]
    killed = folder / "killed"
    # Jobs 0 and 1 had finished: their results and checkpoints are the same files.
    for job in ("0", "1"):
        assert stamps(killed / job) == continued["before"][job]
    attempts = last_attempts(killed, *window(continued, "continue"))
    assert attempts == {"0": "reuse", "1": "reuse", "2": "resume", "3": "run"}
    for job in JOBS:
        metrics = json.loads((killed / job / "metrics.json").read_text())
        straight = json.loads((folder / "straight" / job / "metrics.json").read_text())
        assert metrics["status"] == "completed"
        assert split_metrics(metrics) == split_metrics(straight)
        assert metrics["global_step"] == straight["global_step"] == 8
    summary = results["continue"]["read"]  # as that command left it
    assert "Last command: 1 run, 1 resumed, 2 reused (finished before)." in summary
    assert (
        "Job 0 finished earlier (completed): reused, nothing ran." in results["continue"]["stdout"]
    )


def test_an_attempt_that_left_nothing_to_resume_from_starts_again(tmp_path):
    job = tmp_path / "3"
    (job / "checkpoints").mkdir(parents=True)
    # Stopped twice in its first epoch: a record, a best checkpoint, no last.ckpt.
    (job / "metrics.json").write_text(json.dumps({"status": "interrupted"}))
    (job / "checkpoints" / "best-epoch000.ckpt").write_bytes(b"stale")
    cfg = OmegaConf.create(
        {
            "resume": None,
            "paths": {"output_dir": str(job), "checkpoint_dir": str(job / "checkpoints")},
        }
    )
    assert plan_job(cfg).action == "run"
    assert not (job / "metrics.json").exists()
    assert not list((job / "checkpoints").glob("*.ckpt"))


def test_rerunning_a_finished_sweep_trains_nothing(continued):
    folder, result = continued["folder"], continued["results"]["finished"]
    assert result["code"] == 0, result["stderr"][-3000:]
    attempts = last_attempts(folder / "killed", *window(continued, "finished"))
    assert attempts == dict.fromkeys(JOBS, "reuse")
    assert "Epoch" not in result["stdout"] + result["stderr"]


def test_a_sweep_with_other_settings_is_refused_per_job_naming_the_key(continued):
    folder, result = continued["folder"], continued["results"]["changed"]
    assert result["code"] == 1
    assert "Error: 4 job(s) of this sweep did not run (0, 1, 2, 3)" in result["stderr"]
    attempts = last_attempts(folder / "killed", *window(continued, "changed"))
    assert attempts == dict.fromkeys(JOBS, "refused")
    assert "Job 0 refused: " in result["stderr"]
    assert "model.kl_warmup_epochs was 0, now 1" in result["stderr"]
    # The jobs' own logs say nothing of a command that did not own their folders.
    assert "kl_warmup" not in (folder / "killed" / "0" / "train.log").read_text()
    # The sweep's first log line says how to continue it.
    straight = continued["results"]["straight"]["stdout"]
    assert f"hydra.sweep.dir={folder / 'straight'}" in straight
    assert "If the sweep stops, this continues it" in straight
