"""`genlab-train` as a user runs it: command lines through the console script's entry point,
in fresh interpreters (`commands.run_commands`), and the installed script itself in a
subprocess that is killed and resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from commands import command_env, command_path, run_command, run_commands

# The limits of the acceptance runs: one short epoch.
ACCEPTANCE_LIMITS = [
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=20",
    "++trainer.limit_val_batches=5",
    "++trainer.limit_test_batches=5",
]
RUNS = {
    "model=vae data=mnist": "genlab.models.VAE",
    "model=ae data=fashion_mnist": "genlab.models.AE",
    "model=gan data=mnist": "genlab.models.GAN",
    "model=vae data=fashion_mnist model/net=conv": "genlab.models.VAE",
}


@pytest.fixture(scope="module")
def acceptance(data_dir, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The acceptance commands below, run once, one after another in one interpreter:
    their folder, and the result of each by name."""
    folder = tmp_path_factory.mktemp("acceptance")
    cases = {
        **{
            spec: {"args": [*spec.split(), *ACCEPTANCE_LIMITS, f"hydra.run.dir={folder / str(i)}"]}
            for i, spec in enumerate(RUNS)
        },
        "seed --cfg job": {"args": ["experiment=seed_vae_mnist", "--cfg", "job"]},
        "multirun": {
            "args": [
                "-m",
                "model.latent_dim=2,4",
                *ACCEPTANCE_LIMITS,
                f"hydra.sweep.dir={folder / 'sweep'}",
            ]
        },
        "missing data": {
            "args": ["data.download=false", f"hydra.run.dir={folder / 'no_data'}"],
            "unset": ["GENLAB_DATA_DIR"],
        },
    }
    results = run_commands("genlab-train", list(cases.values()), data_dir, folder)
    return folder, dict(zip(cases, results))


@pytest.mark.parametrize(("spec", "target"), RUNS.items())
def test_a_run_leaves_a_complete_run_directory(spec, target, acceptance):
    folder, results = acceptance
    run_dir = folder / str(list(RUNS).index(spec))
    assert results[spec]["code"] == 0, results[spec]["stderr"][-3000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["model"]["_target_"] == target
    assert config["data"]["dataset"] == spec.split()[1].removeprefix("data=")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run_dir / "checkpoints").glob("*.ckpt"))


def test_seed_experiment_composes_the_classic_vae(acceptance):
    result = acceptance[1]["seed --cfg job"]
    assert result["code"] == 0, result["stderr"]
    cfg = yaml.safe_load(result["stdout"])
    assert cfg["model"]["_target_"] == "genlab.models.VAE"
    assert cfg["model"]["latent_dim"] == 2
    assert cfg["model"]["net"]["hidden_dims"] == [256]
    assert cfg["model"]["net"]["activation"] == "relu"
    assert cfg["model"]["recon_loss"] == "bce" and cfg["model"]["beta"] == 1.0
    assert cfg["model"]["optimizer"]["lr"] == 1e-3
    assert cfg["data"]["batch_size"] == 128
    assert cfg["trainer"]["max_epochs"] == 20


def test_multirun_writes_one_directory_per_job(acceptance):
    folder, results = acceptance
    assert results["multirun"]["code"] == 0, results["multirun"]["stderr"][-3000:]
    sweep_dir = folder / "sweep"
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    latent_dims = []
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
        latent_dims.append(
            yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["model"]["latent_dim"]
        )
    assert latent_dims == [2, 4]


def test_missing_data_is_one_clear_paragraph_without_a_traceback(acceptance):
    folder, results = acceptance
    result = results["missing data"]
    assert result["code"] not in (0, None, "uncaught")
    assert "Traceback" not in result["stderr"] + result["stdout"]
    error = [line for line in result["stderr"].splitlines() if line.startswith("Error:")]
    assert len(error) == 1
    assert str(folder / "data") in error[0]
    assert "GENLAB_DATA_DIR" in error[0] and "data.data_dir" in error[0]


_IMPORTED = """
import contextlib, io, json, sys
from genlab import cli

commands = {
    "genlab-train": cli.train_command, "genlab-eval": cli.eval_command, "genlab-report": cli.report_command
}
for name, *args in json.loads(sys.argv[1]):
    sys.argv = [name, *args]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        commands[name]()
print(json.dumps(sorted(m for m in ("torch", "pytorch_lightning", "torchvision") if m in sys.modules)))
"""


def test_help_and_cfg_import_no_torch(tmp_path):
    commands = [
        ["genlab-train", "--help"],
        ["genlab-train", "experiment=seed_vae_mnist", "--cfg", "job"],
        ["genlab-eval", "--help"],
        ["genlab-report", "--help"],
    ]
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTED, json.dumps(commands)],
        cwd=tmp_path,
        env=command_env(None),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_help_is_written_for_each_command(tmp_path):
    def help_text(command: str) -> str:
        done = run_command(command, "--help", data_dir=None, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout

    train_help, eval_help = help_text("genlab-train"), help_text("genlab-eval")
    assert train_help.startswith("genlab-train: train an autoencoder, a VAE or a GAN")
    assert "powered by Hydra" not in train_help + eval_help
    assert "genlab-train -m model.latent_dim=2,4,8 model.beta=0.5,1,2" in train_help
    assert "model: ae, gan, vae" in train_help and "trainer: auto, cpu, ddp, gpu" in train_help
    # genlab-eval: its required argument, and none of the training groups.
    assert "Usage: genlab-eval ckpt_path=<checkpoint>" in eval_help
    assert "Required:\n  ckpt_path=<file>" in eval_help
    assert "model: ae, gan, vae" not in eval_help and "trainer:" not in eval_help
    assert "nll_samples: 1000" in eval_help


# -- clean errors, reproduction and crash safety, through the real entry point -----------------

FAST_CLI = [
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=3",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.eval_batch_size=256",
]

# A user pressing Ctrl-C during the third training step (a callback cases name as __main__.PressCtrlC).
PRESS_CTRL_C = """
import os, signal
import pytorch_lightning as pl

class PressCtrlC(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)
"""


# Each exits != 0 with one "Error:" paragraph and no traceback. The first ten are the
# acceptance list; {tmp} is the test's folder.
CLEAN_ERRORS = [
    ("model=vea", "ae, gan, vae"),
    ("data=cifar", "fashion_mnist, mnist"),
    ("model.latent_dim=0", "model.latent_dim=0"),
    ("model.latent_dim=-3", "model.latent_dim=-3"),
    ("model.beta=-1", "model.beta=-1"),
    ("model.latnet_dim=4", "did you mean latent_dim"),
    ("data.batch_size=abc", "data.batch_size='abc'"),
    ("trainer.max_epochs=-5", "trainer.max_epochs=-5"),
    ("data.data_dir=/nonexistent/path", "/nonexistent/path"),
    ("model.optimizer.lr=0", "model.optimizer.lr=0"),
    ("model.latent_dim=2.5", "model.latent_dim=2.5"),
    ("model=gan trainer.gradient_clip_val=1", "manual optimisation"),
    ("model=gan callbacks=default", "last_checkpoint_only"),
    ("model/net=transformer", "conv, dcgan, mlp"),
    ("logger=null", "~logger"),
    ("++trainer.limt_train_batches=3", "did you mean limit_train_batches"),
    ("data.data_dir={tmp}/corrupt", "train-images-idx3-ubyte' is not a valid IDX file"),
    ("data=fashion_mnist data.verify=true", "train-images-idx3-ubyte' is not the official"),
    ("resume=last", "resume=last found no checkpoint"),
    ("model=vae resume={tmp}/gan/checkpoints/last.ckpt", "model._target_ was 'genlab.models.GAN'"),
    ("model=gan model.latent_dim=8 hydra.run.dir={tmp}/gan", "already holds the results"),
]


def test_the_cli_reports_errors_cleanly_and_reproduces_a_run(data_dir, tmp_path):
    corrupt = tmp_path / "corrupt" / "MNIST" / "raw"
    corrupt.mkdir(parents=True)
    for source in (data_dir / "MNIST" / "raw").iterdir():
        (corrupt / source.name).symlink_to(source.resolve())
    images = corrupt / "train-images-idx3-ubyte"
    truncated = images.read_bytes()[:1_000_000]
    images.unlink()
    images.write_bytes(truncated)

    gan, again = tmp_path / "gan", tmp_path / "again"
    runs = [
        {"args": ["model=gan", *FAST_CLI, f"hydra.run.dir={gan}"]},
        # The short form that reruns a run from its directory.
        {
            "args": [
                "--config-dir",
                f"{gan}/.hydra",
                "--config-name",
                "config",
                f"hydra.run.dir={again}",
            ]
        },
    ]
    errors = [
        {"args": [*FAST_CLI, f"hydra.run.dir={tmp_path}/e{i}", *spec.format(tmp=tmp_path).split()]}
        for i, (spec, _) in enumerate(CLEAN_ERRORS)
    ]
    diverging = {
        "args": ["model.optimizer.lr=1e30", *FAST_CLI, f"hydra.run.dir={tmp_path}/diverged"]
    }
    full_error = {"args": ["model=vea"], "env": {"HYDRA_FULL_ERROR": "1"}}
    two_epochs = [*FAST_CLI, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}/ctrl_c"]
    ctrl_c = [
        {
            "args": [*two_epochs, "+callbacks.ctrl_c._target_=__main__.PressCtrlC"],
            "read": str(tmp_path / "ctrl_c" / "metrics.json"),
        },
        {"args": [*two_epochs, "resume=last"]},
    ]

    cases = [*runs, *errors, diverging, full_error, *ctrl_c]
    results = run_commands("genlab-train", cases, data_dir, tmp_path, prelude=PRESS_CTRL_C)
    (gan_run, rerun), results = results[:2], results[2:]
    error_results, (diverged, full, stopped, resumed) = results[:-4], results[-4:]

    assert gan_run["code"] == 0 and rerun["code"] == 0, gan_run["stderr"] + rerun["stderr"]
    # The rerun from the run directory's own config logs to train.log, as the run did.
    assert (gan / "train.log").is_file() and (again / "train.log").is_file()
    first = json.loads((gan / "metrics.json").read_text())
    second = json.loads((again / "metrics.json").read_text())
    assert {k: v for k, v in first.items() if "/" in k} == {
        k: v for k, v in second.items() if "/" in k
    }

    for (spec, words), result in zip(CLEAN_ERRORS, error_results):
        output = result["stdout"] + result["stderr"]
        assert result["code"] not in (0, None, "uncaught"), f"{spec}: {output[-2000:]}"
        assert "Traceback" not in output, f"{spec}: {output[-2000:]}"
        (error,) = [line for line in result["stderr"].splitlines() if line.startswith("Error:")]
        assert words in error, f"{spec}: {error}"
    # The refused fresh run (latent_dim=8) left the earlier run's record as it was.
    assert "latent_dim: 64" in (gan / ".hydra" / "config.yaml").read_text()
    assert "latent_dim=8" not in (gan / ".hydra" / "overrides.yaml").read_text()

    # A diverging run is not a crash: a clear message, status "diverged", exit code 1.
    assert diverged["code"] == 1 and "Traceback" not in diverged["stdout"] + diverged["stderr"]
    assert "Training diverged" in diverged["stdout"] + diverged["stderr"]
    assert json.loads((tmp_path / "diverged" / "metrics.json").read_text())["status"] == "diverged"

    assert full["code"] != 0 and "Traceback" in full["stderr"] and "model=vea" in full["stderr"]

    # Ctrl-C: the step finishes, a checkpoint is saved, exit code 130, no traceback.
    output = stopped["stdout"] + stopped["stderr"]
    assert stopped["code"] == 130 and "Traceback" not in output, output[-3000:]
    assert "Ctrl-C: stopping after this batch" in output
    interrupted = json.loads(stopped["read"])
    assert interrupted["status"] == "interrupted" and interrupted["global_step"] == 3
    assert resumed["code"] == 0, resumed["stderr"][-3000:]
    finished = json.loads((tmp_path / "ctrl_c" / "metrics.json").read_text())
    assert finished["status"] == "completed" and finished["global_step"] == 6


def test_a_run_killed_mid_training_resumes_to_the_end(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    command = [
        command_path("genlab-train"),
        "trainer.max_epochs=1",
        "++trainer.limit_train_batches=200",
        "++trainer.limit_val_batches=1",
        "++trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=2",
        "data.batch_size=32",
        "data.eval_batch_size=500",
        "model.net.hidden_dims=[32]",
        "callbacks.last_checkpoint.every_n_train_steps=10",
        "callbacks.images.projector_points=0",  # its files would be a folder in tensorboard/
        f"hydra.run.dir={run_dir}",
    ]
    env = command_env(data_dir)
    last = run_dir / "checkpoints" / "last.ckpt"

    # kill -9 once a mid-epoch checkpoint exists and later steps have been logged.
    killed = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not last.exists():
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    (events_file,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    logged = events_file.stat().st_size
    while events_file.stat().st_size == logged and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed_at = torch.load(last)["global_step"]
    assert 0 < killed_at < 200

    finished = subprocess.run(
        [*command, "resume=last"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 200
    # One TensorBoard history: one folder, no step twice. The step of the checkpoint the
    # kill followed may be missing: Lightning hands a batch's values to the loggers only
    # after the batch's checkpoint hooks, and a kill may come before they reach the disk.
    assert not [p for p in (run_dir / "tensorboard").iterdir() if p.is_dir()]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss_step")]
    assert steps == sorted(set(steps))
    assert set(range(1, 200, 2)) - set(steps) <= {killed_at - 1}
