"""Runs repeat, resume and stop safely: determinism, reproduction from a run directory,
resume after Ctrl-C or at an epoch boundary, divergence, atomic checkpoints."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from genlab import rundir
from genlab.errors import GenlabError
from genlab.models import VAE
from genlab.train import train


def split_metrics(metrics: dict) -> dict:
    """Every ``split/name`` entry of metrics.json (timing fields aside)."""
    return {k: v for k, v in metrics.items() if "/" in k}


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard tag, as TensorBoard loads the run's event files."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.parametrize("model", ["vae", "gan"])
def test_the_same_config_and_seed_give_identical_metrics(make_cfg, tmp_path, model):
    first = train(make_cfg(f"model={model}", run_dir=tmp_path / "first"))
    second = train(make_cfg(f"model={model}", run_dir=tmp_path / "second"))
    assert len(split_metrics(first)) >= 5
    assert all(math.isfinite(v) for v in split_metrics(first).values())
    assert split_metrics(first) == split_metrics(second)


def test_a_run_directory_reproduces_its_run(make_cfg, tmp_path):
    original = train(make_cfg("model=ae", "model.latent_dim=3", run_dir=tmp_path / "original"))
    saved = tmp_path / "original" / rundir.CONFIG_DIR
    with initialize_config_dir(config_dir=str(saved), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={tmp_path / 'again'}"])
    assert cfg.model.latent_dim == 3
    again = train(cfg)
    assert split_metrics(again) == split_metrics(original)

    environment = json.loads((tmp_path / "original" / rundir.ENVIRONMENT_FILE).read_text())
    assert environment["packages"]["torch"] == torch.__version__.split("+")[0]
    assert environment["packages"]["pytorch-lightning"]
    assert "git_commit" in environment and environment["python"]


def _send_ctrl_c_at(monkeypatch, epoch: int, batch: int) -> None:
    """Press Ctrl-C (a real SIGINT to this process) during one training step."""
    step = VAE.training_step

    def training_step(self, batch_, batch_idx):
        loss = step(self, batch_, batch_idx)
        if (self.current_epoch, batch_idx) == (epoch, batch):
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(VAE, "training_step", training_step)


def test_resumed_runs_end_exactly_as_uninterrupted_ones(make_cfg, tmp_path, monkeypatch):
    # The halving schedule makes the second epoch depend on the restored scheduler state.
    halving = "{_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:1,gamma:0.5}"
    settings = (
        "model=vae",
        f"model.scheduler={halving}",
        "++trainer.limit_train_batches=4",
        "trainer.log_every_n_steps=1",
    )
    straight = train(make_cfg(*settings, "trainer.max_epochs=2", run_dir=tmp_path / "straight"))

    # Stopped at an epoch boundary, then continued.
    train(make_cfg(*settings, "trainer.max_epochs=1", run_dir=tmp_path / "boundary"))
    boundary = train(
        make_cfg(*settings, "trainer.max_epochs=2", "resume=last", run_dir=tmp_path / "boundary")
    )
    assert split_metrics(boundary) == split_metrics(straight)

    # Ctrl-C in the middle of the second epoch: the batch finishes, a checkpoint is saved.
    with monkeypatch.context() as patch:
        _send_ctrl_c_at(patch, epoch=1, batch=1)
        stopped = train(make_cfg(*settings, "trainer.max_epochs=2", run_dir=tmp_path / "ctrl_c"))
    assert stopped["status"] == "interrupted" and stopped["global_step"] == 6
    assert stopped["last_checkpoint"] == "checkpoints/last.ckpt"
    saved = json.loads((tmp_path / "ctrl_c" / "metrics.json").read_text())
    assert saved["status"] == "interrupted"
    assert torch.load(tmp_path / "ctrl_c" / saved["last_checkpoint"])["global_step"] == 6

    # An attempt that crashed after that checkpoint had logged steps the resumed run repeats.
    with SummaryWriter(tmp_path / "ctrl_c" / "tensorboard") as crashed:
        for step in range(6, 9):
            crashed.add_scalar("train/loss_step", -1.0, step)

    resumed = train(
        make_cfg(*settings, "trainer.max_epochs=2", "resume=last", run_dir=tmp_path / "ctrl_c")
    )
    assert resumed["status"] == "completed"
    assert split_metrics(resumed) == split_metrics(straight)
    # One TensorBoard history: each step once, with the values of the uninterrupted run.
    history = scalars(tmp_path / "ctrl_c", "train/loss_step")
    assert history == scalars(tmp_path / "straight", "train/loss_step")
    assert [s for s, _ in history] == list(range(8))
    assert scalars(tmp_path / "ctrl_c", "train/loss") == scalars(
        tmp_path / "straight", "train/loss"
    )
    assert not list((tmp_path / "ctrl_c" / "tensorboard").glob("version_*"))


def test_a_resumed_run_continues_its_csv_log(make_cfg, tmp_path):
    settings = ("model=ae", "logger=csv", "trainer.log_every_n_steps=1")
    train(make_cfg(*settings))
    log = tmp_path / "run" / "csv" / "metrics.csv"
    with log.open(newline="") as f:
        header = csv.DictReader(f).fieldnames
    with log.open("a", newline="") as f:  # a crashed attempt logged past the checkpoint
        csv.DictWriter(f, fieldnames=header).writerow({"step": 3, "train/loss_step": -1.0})

    train(make_cfg(*settings, "trainer.max_epochs=2", "resume=last"))
    with log.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert all(float(r["train/loss_step"]) > 0 for r in rows)


def test_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_says_so(
    make_cfg, tmp_path, monkeypatch
):
    step = VAE.step

    def step_that_blows_up(self, batch, batch_idx, split):
        metrics = step(self, batch, batch_idx, split)
        if split == "train" and self.global_step >= 4:  # the second batch of epoch 1
            metrics["loss"] = metrics["loss"] * float("nan")
        return metrics

    monkeypatch.setattr(VAE, "step", step_that_blows_up)
    metrics = train(make_cfg("model=vae", "trainer.max_epochs=2"))

    assert metrics["status"] == "diverged" and metrics["global_step"] == 4
    assert "train/loss=nan" in metrics["message"] and "model.optimizer.lr" in metrics["message"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0 and last["global_step"] == 3  # saved at the end of epoch 0
    assert all(torch.isfinite(w).all() for w in last["state_dict"].values())


def test_a_refused_fresh_run_changes_nothing_in_the_run_directory(make_cfg, tmp_path):
    train(make_cfg("model=ae"))
    files = {
        p: p.read_bytes()
        for p in (tmp_path / "run").rglob("*")
        if p.is_file() and "tensorboard" not in p.parts
    }
    with pytest.raises(GenlabError, match="resume=last"):
        train(make_cfg("model=ae", "model.latent_dim=4"))
    assert {p: p.read_bytes() for p in files} == files


def test_resume_names_a_checkpoint_it_cannot_read_or_that_belongs_to_another_model(
    make_cfg, tmp_path
):
    train(make_cfg("model=gan", run_dir=tmp_path / "gan"))
    gan_checkpoint = tmp_path / "gan" / "checkpoints" / "last.ckpt"
    with pytest.raises(GenlabError, match=r"model\._target_ was 'genlab\.models\.GAN'"):
        train(make_cfg("model=vae", f"resume={gan_checkpoint}"))

    broken = tmp_path / "broken" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "last.ckpt").write_bytes(gan_checkpoint.read_bytes()[:5000])
    with pytest.raises(GenlabError, match="is not a readable checkpoint") as err:
        train(make_cfg("model=gan", "resume=last", run_dir=tmp_path / "broken"))
    assert str(broken / "last.ckpt") in str(err.value)


_SAVE_FOREVER = """
import sys, torch
from genlab.checkpoints import AtomicCheckpointIO
io, n = AtomicCheckpointIO(), 0
while True:
    n += 1
    io.save_checkpoint({"n": n, "weights": torch.full((2_000_000,), float(n))}, sys.argv[1])
"""


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    saver = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(path)])
    partial = tmp_path / f".last.ckpt.{saver.pid}.partial"
    try:
        deadline = time.monotonic() + 60
        # Wait until a checkpoint exists and the next save is being written.
        while not (path.exists() and partial.exists()):
            assert saver.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        saver.send_signal(signal.SIGKILL)
    finally:
        saver.kill()
        saver.wait()
    checkpoint = torch.load(path)
    assert checkpoint["weights"].shape == (2_000_000,)
    assert bool((checkpoint["weights"] == checkpoint["n"]).all())
