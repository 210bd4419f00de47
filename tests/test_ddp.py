"""Training on several processes (Lightning DDP on the CPU, gloo): sharded batches, one run directory."""

from __future__ import annotations

import json
import re

import torch
from hydra import compose, initialize_config_dir

from commands import genlab_train
from genlab.config import CONF_DIR, compose_config
from genlab.data import BatchLoader

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def shares(size: int, batch_size: int, world_size: int, even: bool) -> list[list[int]]:
    """The example indices each process draws in one epoch."""
    images, labels = torch.arange(size).float().view(size, 1, 1, 1), torch.arange(size)
    return [
        torch.cat(
            [
                y
                for _, y in BatchLoader(
                    images,
                    labels,
                    batch_size,
                    shuffle=True,
                    seed=3,
                    rank=rank,
                    world_size=world_size,
                    even_shards=even,
                )
            ]
        ).tolist()
        for rank in range(world_size)
    ]


def test_processes_share_each_epoch_without_overlap():
    # 10 batches of 10 over 3 processes: 4 + 3 + 3.
    first, second, third = shares(100, 10, 3, even=False)
    assert (len(first), len(second), len(third)) == (40, 30, 30)
    assert sorted(first + second + third) == list(range(100))  # disjoint, and the whole epoch


def test_training_shares_are_topped_up_to_equal_steps():
    loaders = shares(100, 10, 3, even=True)
    assert [len(share) for share in loaders] == [40, 40, 40]  # every process takes 4 steps
    assert set().union(*loaders) == set(range(100))
    # The top-up repeats the epoch's first batches rather than leaving any example out.
    first_batch = loaders[0][:10]
    assert loaders[1][-10:] == first_batch and loaders[2][-10:] == first_batch


def test_the_ddp_preset_composes():
    cfg = compose_config([*DDP, "trainer.num_nodes=2"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2
    assert cfg.trainer.num_nodes == 2


def test_two_cpu_processes_train_one_run(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = genlab_train(
        *DDP,
        "model=vae",
        "data=mnist",
        "trainer.max_epochs=1",
        "++trainer.limit_val_batches=2",
        "++trainer.limit_test_batches=2",
        "data.batch_size=512",
        "trainer.enable_progress_bar=false",
        "callbacks.images.latent_points=300",
        f"hydra.run.dir={run_dir}",
        data_dir=data_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # 55,000 training images in batches of 512: 108 batches, 54 for each process.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 54
    logs = "".join(p.read_text() for p in run_dir.glob("*.log"))
    found = sorted(re.findall(r"Process (\d) of 2 trains on (\d+) of the (\d+)", logs))
    assert found == [("0", "54", "108"), ("1", "54", "108")]
    # One run directory, written once: one metrics.json, one set of checkpoints.
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best-epoch000.ckpt",
        "last.ckpt",
    ]
    assert len(list(run_dir.rglob("metrics.json"))) == 1


def test_the_cluster_commands_in_the_readme_compose():
    readme = (CONF_DIR.parent / "README.md").read_text()
    section = readme.split("## Running on a cluster")[1].split("\n## ")[0]
    block = section.split("```bash")[1].split("```")[0].replace("\\\n", " ")
    commands = [line.split("#")[0].split()[1:] for line in block.strip().splitlines()]
    assert len(commands) == 4
    for args in commands:
        overrides = [arg for arg in args if arg != "-m"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        if "trainer=ddp" in overrides:
            assert cfg.trainer.strategy == "ddp"
        if "hydra/launcher=slurm" in overrides:
            assert cfg.hydra.launcher.tasks_per_node * cfg.hydra.launcher.nodes == (
                cfg.trainer.devices * cfg.trainer.num_nodes if "trainer=ddp" in overrides else 1
            )
