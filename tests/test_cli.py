"""`genlab-train` as a user runs it: the installed console script in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# The limits of the acceptance runs: one short epoch.
ACCEPTANCE_LIMITS = [
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=20",
    "++trainer.limit_val_batches=5",
    "++trainer.limit_test_batches=5",
]


def genlab_train(*args: str, data_dir: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    # The script installed beside this interpreter, even when its environment is not activated.
    exe = shutil.which("genlab-train", path=str(Path(sys.executable).parent))
    assert exe, "genlab-train is not installed: pip install -e '.[dev]'"
    env = {k: v for k, v in os.environ.items() if k not in ("GENLAB_DATA_DIR", "HYDRA_FULL_ERROR")}
    if data_dir is not None:
        env["GENLAB_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [exe, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        ("model=vae data=mnist", "genlab.models.VAE"),
        ("model=ae data=fashion_mnist", "genlab.models.AE"),
        ("model=gan data=mnist", "genlab.models.GAN"),
        ("model=vae data=fashion_mnist model/net=conv", "genlab.models.VAE"),
    ],
)
def test_a_run_leaves_a_complete_run_directory(spec, target, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = genlab_train(
        *spec.split(),
        *ACCEPTANCE_LIMITS,
        f"hydra.run.dir={run_dir}",
        data_dir=data_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["model"]["_target_"] == target
    assert config["data"]["dataset"] == spec.split()[1].removeprefix("data=")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run_dir / "checkpoints").glob("*.ckpt"))


def test_seed_experiment_composes_the_classic_vae(tmp_path):
    result = genlab_train("experiment=seed_vae_mnist", "--cfg", "job", data_dir=None, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"]["_target_"] == "genlab.models.VAE"
    assert cfg["model"]["latent_dim"] == 2
    assert cfg["model"]["net"]["hidden_dims"] == [256]
    assert cfg["model"]["net"]["activation"] == "relu"
    assert cfg["model"]["recon_loss"] == "bce" and cfg["model"]["beta"] == 1.0
    assert cfg["model"]["optimizer"]["lr"] == 1e-3
    assert cfg["data"]["batch_size"] == 128
    assert cfg["trainer"]["max_epochs"] == 20


def test_multirun_writes_one_directory_per_job(data_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = genlab_train(
        "-m",
        "model.latent_dim=2,4",
        *ACCEPTANCE_LIMITS,
        f"hydra.sweep.dir={sweep_dir}",
        data_dir=data_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    latent_dims = []
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
        latent_dims.append(
            yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["model"]["latent_dim"]
        )
    assert latent_dims == [2, 4]


def test_missing_data_is_one_clear_paragraph_without_a_traceback(tmp_path):
    result = genlab_train(
        "data.download=false", f"hydra.run.dir={tmp_path / 'run'}", data_dir=None, cwd=tmp_path
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1
    assert str(tmp_path / "data") in error[0]
    assert "GENLAB_DATA_DIR" in error[0] and "data.data_dir" in error[0]
