"""Shared fixtures: the real data sets, and configs composed as the CLI would compose them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from genlab.config import compose_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Where MNIST and Fashion-MNIST live: $GENLAB_DATA_DIR, else ./data (as genlab looks)."""
    path = Path(os.environ.get("GENLAB_DATA_DIR", "./data"))
    if not (path / "MNIST" / "raw").is_dir() or not (path / "FashionMNIST" / "raw").is_dir():
        pytest.fail(
            f"The tests train on real MNIST and Fashion-MNIST, not found under {str(path)!r}: "
            "set GENLAB_DATA_DIR to a folder in torchvision's layout."
        )
    return path


# Small enough that a run takes a second or two on a laptop CPU.
FAST = [
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=3",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "++trainer.enable_model_summary=false",
    "++trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "data.eval_batch_size=256",
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
