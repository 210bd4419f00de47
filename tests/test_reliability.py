"""Runs repeat, resume and stop safely: determinism, reproduction from a run directory,
resume after Ctrl-C or at an epoch boundary, divergence, atomic checkpoints."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from commands import command_env, command_path
from conftest import FAST
from genlab import rundir
from genlab.errors import GenlabError
from genlab.models import VAE
from genlab.models.lean import LeanLightningModule
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


@pytest.fixture(params=["host", "device"])
def metric_sums(request, monkeypatch) -> str:
    """Training metrics summed as host floats (a CPU's way) or on the device without a read
    per step (a GPU's way, tried here on the CPU)."""
    monkeypatch.setattr(LeanLightningModule, "metric_sums", request.param)
    return request.param


def test_sums_kept_on_the_device_give_the_hosts_numbers(make_cfg, tmp_path, monkeypatch):
    settings = ("model=vae", "trainer.max_epochs=2", "trainer.log_every_n_steps=2")
    host = train(make_cfg(*settings, run_dir=tmp_path / "host"))
    monkeypatch.setattr(LeanLightningModule, "metric_sums", "device")
    device = train(make_cfg(*settings, run_dir=tmp_path / "device"))
    assert split_metrics(device) == split_metrics(host)
    for tag in ("train/loss", "train/loss_step"):
        assert scalars(tmp_path / "device", tag) == scalars(tmp_path / "host", tag)


def test_resumed_runs_end_exactly_as_uninterrupted_ones(
    make_cfg, tmp_path, monkeypatch, metric_sums
):
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
    make_cfg, tmp_path, monkeypatch, metric_sums
):
    step = VAE.step

    def step_that_blows_up(self, batch, batch_idx, split):
        metrics = step(self, batch, batch_idx, split)
        if split == "train" and self.global_step >= 4:  # the second batch of epoch 1
            metrics["loss"] = metrics["loss"] * float("nan")
        return metrics

    monkeypatch.setattr(VAE, "step", step_that_blows_up)
    metrics = train(make_cfg("model=vae", "trainer.max_epochs=2"))

    assert metrics["status"] == "diverged"
    if metric_sums == "host":  # read at every step: stopped at the step itself
        assert metrics["global_step"] == 4 and "train/loss=nan" in metrics["message"]
    else:  # read at the epoch's last step, before its pictures and checkpoint
        assert metrics["global_step"] == 5
        assert "Training diverged: train/loss, " in metrics["message"]
        assert "became NaN or infinite in epoch 1" in metrics["message"]
    assert "model.optimizer.lr" in metrics["message"]
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


def test_a_run_directory_belongs_to_one_command_at_a_time(data_dir, tmp_path):
    owner_dir, killed_dir = tmp_path / "owner", tmp_path / "killed"
    settings = [
        *FAST,
        f"data.data_dir={data_dir}",
        "++trainer.limit_train_batches=20",
        "callbacks.last_checkpoint.every_n_train_steps=5",
    ]

    def start(run_dir: Path, *extra: str) -> subprocess.Popen:
        args = [*settings, f"hydra.run.dir={run_dir}", *extra]
        return subprocess.Popen(
            [command_path("genlab-train"), *args],
            cwd=tmp_path,
            env=command_env(data_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_for(path: Path, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.02)

    owner = start(owner_dir, "model.latent_dim=3")
    wait_for(owner_dir / rundir.LOCK_FILE, owner)
    owner.send_signal(signal.SIGSTOP)  # held mid-run, however fast this machine
    try:
        second = start(owner_dir, "model.latent_dim=5")
        _, refusal = second.communicate(timeout=120)
    finally:
        owner.send_signal(signal.SIGCONT)
    owner.communicate(timeout=300)
    assert owner.returncode == 0
    assert second.returncode == 1 and refusal.startswith("Error:"), refusal
    assert "in use by another genlab command" in refusal and str(owner.pid) in refusal
    # Every file of the folder is the first run's.
    assert (
        yaml.safe_load((owner_dir / ".hydra" / "config.yaml").read_text())["model"]["latent_dim"]
        == 3
    )
    last = torch.load(owner_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["genlab_config"]["model"]["latent_dim"] == 3
    assert json.loads((owner_dir / "metrics.json").read_text())["status"] == "completed"
    assert not list(owner_dir.rglob("*-v1.ckpt")) and not (owner_dir / rundir.LOCK_FILE).exists()

    # kill -9 leaves its lock file behind, but the lock dies with the process.
    killed = start(killed_dir)
    wait_for(killed_dir / "checkpoints" / "last.ckpt", killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert (killed_dir / rundir.LOCK_FILE).exists()
    resumed = start(killed_dir, "resume=last")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err


def _fail_writes(monkeypatch, number: int, when) -> None:
    """Make torch.save fail like a full disk (after writing a little) when ``when(checkpoint)``."""
    save = torch.save

    def save_or_fail(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and when(obj):
            f.write(b"x" * 4096)
            raise OSError(number, os.strerror(number))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_or_fail)


def test_a_full_disk_stops_the_run_with_one_error_and_keeps_the_last_checkpoint(
    make_cfg, tmp_path, monkeypatch
):
    _fail_writes(monkeypatch, errno.ENOSPC, lambda checkpoint: checkpoint.get("epoch") == 1)
    with pytest.raises(GenlabError) as err:
        train(make_cfg("model=vae", "trainer.max_epochs=2"))
    message = str(err.value)
    assert "the disk is full" in message and "MiB free there" in message
    assert str(tmp_path / "run" / "checkpoints") in message and "resume=last" in message
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics == {"status": "failed", "error": message}
    assert not list((tmp_path / "run").rglob("*.partial"))
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt")["epoch"] == 0


def test_a_read_only_run_folder_is_one_error_naming_the_file(make_cfg, tmp_path, monkeypatch):
    def read_only(path, content):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(rundir, "write_atomically", read_only)
    with pytest.raises(GenlabError, match=r"\.hydra/config\.yaml': the file system is read-only"):
        train(make_cfg("model=ae"))
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_real_full_disk(make_cfg, tmp_path):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tiny)]
    if subprocess.run(mount, check=False, capture_output=True).returncode:
        pytest.skip("mounting a 1 MiB tmpfs needs root; the injected-error test covers the logic")
    try:
        with pytest.raises(GenlabError, match="the disk is full") as err:
            train(make_cfg("model=vae", run_dir=tiny / "run"))
        assert "MiB free there" in str(err.value)
        assert not list(tiny.rglob("*.partial"))
        assert json.loads((tiny / "run" / "metrics.json").read_text())["status"] == "failed"
    finally:
        subprocess.run(["umount", str(tiny)], check=False)


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with rundir.owned(tmp_path / "run"):
        (tmp_path / "run" / "metrics.json").write_text("{}")
    assert "does not support file locks" in caplog.text
    assert not (tmp_path / "run" / rundir.LOCK_FILE).exists()
