"""Shared fixtures: the real data sets, and configs composed as the CLI would compose them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from genlab import fid
from genlab.config import compose_config
from genlab.data import DATASETS, ImageDataModule
from genlab.errors import GenlabError
from genlab.train import train


def pytest_configure(config: pytest.Config) -> None:
    """Give each pytest-xdist worker, and the processes its tests start, its share of the
    cores: torch's threads on every worker at once would oversubscribe them, and OpenMP's
    waiting threads make that many times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Where MNIST and Fashion-MNIST live: $GENLAB_DATA_DIR, else ./data, as genlab looks.

    Missing files are fetched the way a run fetches them; without internet
    access the tests fail with genlab's message saying where it looked.
    """
    path = Path(os.environ.get("GENLAB_DATA_DIR", "./data"))
    for dataset in DATASETS:
        try:
            ImageDataModule(dataset, path, download=True).prepare_data()
        except GenlabError as err:
            pytest.fail(f"The tests train on real data: {err}")
    return path


# Small enough that a run takes a second or two on a laptop CPU.
FAST = [
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=3",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
    "data.eval_batch_size=256",
    "callbacks.images.latent_points=500",
    # The Projector's sprite of the default 2000 test images takes a quarter of such a run.
    "callbacks.images.projector_points=100",
]


@pytest.fixture
def make_cfg(data_dir: Path, tmp_path: Path):
    """Compose the training config with FAST settings, writing the run under tmp_path/run."""

    def make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        run_dir = run_dir or tmp_path / "run"
        return compose_config(
            [*FAST, f"data.data_dir={data_dir}", f"paths.output_dir={run_dir}", *overrides]
        )

    return make


# Evaluation settings small enough for the fast suite. The FID classifier trains
# for a tenth of an epoch (~90% accuracy on MNIST instead of 99%): enough to rank
# image sets, trained once per session into `cache_dir`.
FAST_EVAL = [
    "eval.nll_samples=100",
    "eval.num_samples=500",
    "eval.test_examples=500",
    "eval.classifier_epochs=0.1",
    "eval.device=cpu",
]


@pytest.fixture(scope="session")
def mnist_full(data_dir: Path) -> ImageDataModule:
    """All of MNIST in grey levels: 60000 training images (no validation split), 10000 test."""
    datamodule = ImageDataModule("mnist", data_dir, val_size=0, download=False)
    datamodule.setup()
    return datamodule


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, mnist_full: ImageDataModule) -> Path:
    """paths.cache_dir for the session, holding the FAST_EVAL MNIST classifier (trained here, once)."""
    path = tmp_path_factory.mktemp("cache")
    fid.cached_classifier(
        path, "mnist", 0.1, mnist_full.splits["train"], mnist_full.splits["test"], batch_size=4096
    )
    return path


@pytest.fixture(scope="session")
def vae_checkpoint(tmp_path_factory, data_dir: Path) -> Path:
    """last.ckpt of the short VAE run the evaluation's acceptance describes (latent 8, 100 batches)."""
    run_dir = tmp_path_factory.mktemp("vae_run")
    cfg = compose_config(
        [
            *FAST,
            f"data.data_dir={data_dir}",
            f"paths.output_dir={run_dir}",
            "model=vae",
            "model.latent_dim=8",
            "++trainer.limit_train_batches=100",
        ]
    )
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt"
