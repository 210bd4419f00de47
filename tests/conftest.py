"""Shared fixtures: the real data sets, and configs composed as the CLI would compose them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from genlab.config import compose_config
from genlab.data import DATASETS, ImageDataModule
from genlab.errors import GenlabError


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
