"""Ctrl-C and SIGTERM in every phase of a run, through `genlab-train` as a user runs it:
the exit code, metrics.json's status and phase, a last.ckpt that only ever holds training
state, and a resume that ends exactly as the uninterrupted run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from commands import run_commands
from conftest import FAST

# Two epochs of three batches, two validation batches: a stop can land mid-epoch and mid-validation.
SETTINGS = [
    *FAST,
    "model=vae",
    "trainer.max_epochs=2",
    "++trainer.limit_val_batches=2",
    "++trainer.limit_test_batches=2",
]

# Sends the signal named by $STOP ("SIGTERM:test") to this process in that phase, inside the
# model's own hooks, and records the hash of $RUN_DIR's last.ckpt before the test pass and
# after the command, in files beside that folder.
_PRELUDE = """
import hashlib, os, signal
import genlab.cli
from genlab.data import ImageDataModule
from genlab.models import VAE

def _record_last(suffix):
    run_dir = os.environ.get("RUN_DIR")
    last = os.path.join(run_dir or "", "checkpoints", "last.ckpt")
    if run_dir and os.path.exists(last):
        with open(run_dir + suffix, "w") as f:
            f.write(hashlib.sha256(open(last, "rb").read()).hexdigest())

def _stop(phase):
    name, _, wanted = os.environ.get("STOP", "").partition(":")
    if wanted == phase:
        os.kill(os.getpid(), signal.Signals[name])

def _patch(cls, hook, phase, when):
    original = getattr(cls, hook)
    def patched(self, *args):
        if when(self, *args):
            _stop(phase)
        return original(self, *args)
    setattr(cls, hook, patched)

def _before_test(self, batch, batch_idx):
    if batch_idx == 0:
        _record_last(".before-test")
    return batch_idx == 0

_command = genlab.cli.train_command
def _train_command():
    try:
        _command()
    finally:
        _record_last(".after")
genlab.cli.train_command = _train_command

_patch(ImageDataModule, "prepare_data", "set-up", lambda self: True)
_patch(VAE, "training_step", "training", lambda self, b, i: (self.current_epoch, i) == (1, 1))
_patch(VAE, "validation_step", "validation",
       lambda self, b, i: not self.trainer.sanity_checking and (self.current_epoch, i) == (0, 0))
_patch(VAE, "test_step", "test", _before_test)
"""

PHASES = ["set-up", "training", "validation", "test"]
SIGNALS = ["SIGINT", "SIGTERM"]


def split_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "/" in k}


@pytest.fixture(scope="module")
def stops(data_dir, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run, then for each signal and phase: a run stopped there, and the
    command that continues it (the same command for a stop in set-up, which left nothing)."""
    folder = tmp_path_factory.mktemp("stops")
    cases = {"straight": {"args": [*SETTINGS, f"hydra.run.dir={folder / 'straight'}"]}}
    for name in SIGNALS:
        for phase in PHASES:
            run_dir = folder / f"{name}-{phase}"
            args = [*SETTINGS, f"hydra.run.dir={run_dir}"]
            cases[name, phase, "stop"] = {
                "args": args,
                "env": {"STOP": f"{name}:{phase}", "RUN_DIR": str(run_dir)},
                "read": str(run_dir / "metrics.json"),
            }
            resume = [] if phase == "set-up" else ["resume=last"]
            cases[name, phase, "resume"] = {
                "args": [*args, *resume],
                "read": str(run_dir / "metrics.json"),
            }
    results = run_commands("genlab-train", list(cases.values()), data_dir, folder, prelude=_PRELUDE)
    return folder, dict(zip(cases, results, strict=True))


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name", SIGNALS)
def test_a_stop_in_any_phase_exits_with_the_signal_code_and_says_so(stops, name, phase):
    _, results = stops
    stopped = results[name, phase, "stop"]
    assert stopped["code"] == 128 + signal.Signals[name], stopped["stderr"][-2000:]
    if phase == "set-up":  # before the run is accepted: nothing written
        assert f"Interrupted ({name}) during set-up" in stopped["stderr"]
        assert stopped["read"] is None  # no metrics.json: the rerun below starts afresh
        return
    metrics = json.loads(stopped["read"])
    assert metrics["status"] == "interrupted"
    assert (metrics["phase"], metrics["signal"]) == (phase, name)
    assert "resume=last" in metrics["message"]
    assert metrics["last_checkpoint"] == "checkpoints/last.ckpt"
    assert not split_metrics(metrics)  # no test numbers from a run that did not finish


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name", SIGNALS)
def test_the_stopped_run_continues_to_exactly_the_uninterrupted_result(stops, name, phase):
    _, results = stops
    straight = json.loads((stops[0] / "straight" / "metrics.json").read_text())
    resumed = results[name, phase, "resume"]
    assert resumed["code"] == 0, resumed["stderr"][-2000:]
    metrics = json.loads(resumed["read"])
    assert metrics["status"] == "completed"
    assert split_metrics(metrics) == split_metrics(straight)
    assert (metrics["epochs"], metrics["global_step"]) == (
        straight["epochs"],
        straight["global_step"],
    )


@pytest.mark.parametrize("name", SIGNALS)
def test_a_stop_during_the_test_pass_leaves_last_ckpt_as_training_wrote_it(stops, name):
    folder, results = stops
    run_dir = folder / f"{name}-test"
    before = Path(f"{run_dir}.before-test").read_text()
    after_stop = results[name, "test", "stop"]
    assert after_stop["code"] == 128 + signal.Signals[name]
    # Hashes taken when the test pass began and when the stopped command had ended.
    assert len(before) == 64 and Path(f"{run_dir}.after").read_text() == before
