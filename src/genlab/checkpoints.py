"""Checkpoints: written whole or not at all, ``last.ckpt`` kept up to date, and read
back as data (tensors and plain values, never code) to rebuild a trained model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Checkpoint

from genlab.atomic import write_atomically
from genlab.errors import GenlabError
from genlab.models.base import CONFIG_KEY, GenerativeModel
from genlab.options import Range, checked
from genlab.rundir import LAST_CHECKPOINT


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through `write_atomically`: a crash or ``kill -9``
    during a save leaves the previous checkpoint whole. (Lightning's own stages the file in
    the system's temp folder, and a move from another file system is a copy.)"""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's way
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomically(path, lambda f: torch.save(checkpoint, f))


class LastCheckpoint(Checkpoint):
    """Keeps ``<dirpath>/last.ckpt``, what ``resume=last`` continues from, up to date.

    It is written at the end of every training epoch, every
    ``every_n_train_steps`` optimizer steps when set (mid-epoch checkpoints for
    long epochs; a GAN takes two steps per batch), and when training ends.

    Lightning's ``ModelCheckpoint(save_last=True)`` only writes ``last.ckpt``
    beside a top-k save: with a monitored metric it postpones step saves until
    the first validation, and with ``save_top_k=0`` (the GAN) it writes it only
    when training ends. As a `Checkpoint`, this runs after every
    ``ModelCheckpoint``, so the file records their latest best checkpoint.
    """

    @checked("callbacks.last_checkpoint")
    def __init__(
        self,
        dirpath: str | os.PathLike,
        every_n_train_steps: Annotated[int, Range(1)] | None = None,
    ):
        self.path = Path(dirpath) / LAST_CHECKPOINT
        self.every_n_train_steps = every_n_train_steps
        self._saved_at: int | None = None

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking or self._saved_at == trainer.global_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)


def read_checkpoint(
    path: str | os.PathLike, option: str, map_location: str = "cpu"
) -> dict[str, Any]:
    """The contents of a checkpoint file, loaded as data only (``weights_only``); anything
    else is a `GenlabError` naming ``option``, the setting that pointed at it."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holding arbitrary objects
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in reason:  # torch's advice to unpickle arbitrary code: never needed here
            reason = f"{type(err).__name__}: not a file of tensors and plain data"
        raise GenlabError(
            f"{option}: {str(path)!r} is not a readable checkpoint ({reason}). Point it at a .ckpt "
            f"file that genlab-train wrote."
        ) from err
    if not isinstance(checkpoint, dict):
        raise GenlabError(f"{option}: {str(path)!r} is not a checkpoint that genlab-train wrote.")
    return checkpoint


def load_model(ckpt_path: str | os.PathLike, map_location: str = "cpu") -> GenerativeModel:
    """Rebuild a trained model from a genlab checkpoint (its run config travels inside it)."""
    checkpoint = read_checkpoint(ckpt_path, "ckpt_path", map_location)
    if CONFIG_KEY not in checkpoint:
        raise GenlabError(
            f"{str(ckpt_path)!r} is not a genlab checkpoint (it holds no run config). Pass a "
            f".ckpt file written by genlab-train, e.g. <run dir>/checkpoints/last.ckpt."
        )
    model = instantiate(OmegaConf.create(checkpoint[CONFIG_KEY]).model)
    model.load_state_dict(checkpoint["state_dict"])
    model.run_config = checkpoint[CONFIG_KEY]
    return model.eval()
