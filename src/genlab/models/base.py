"""What every model family shares: optimiser config, metric logging,
seeded evaluation noise, and the run config stored in each checkpoint."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

RECON_LOSSES = ("bce", "mse")
# Gaussian decoder with variance 1/2: -log p(x|z) = squared error + this constant per pixel.
_GAUSSIAN_NLL_CONST = 0.5 * math.log(math.pi)
# Evaluation noise comes from its own generator so val/test numbers do not
# depend on how much randomness training consumed.
_EVAL_SEED = 1234
# Checkpoint entry holding the run's resolved config (see `genlab.run.load_model`).
CONFIG_KEY = "genlab_config"

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def reconstruction_nll(logits: Tensor, x: Tensor, recon_loss: str) -> Tensor:
    """-log p(x | z) per example, summed over pixels, in nats.

    ``bce``: Bernoulli decoder on logits (exact for binary data; for grey
    levels it is the usual cross-entropy). ``mse``: Gaussian decoder with mean
    sigmoid(logits) and fixed variance 1/2, i.e. the summed squared error plus
    a constant, so the optimised term is exactly the squared error.
    """
    if recon_loss == "bce":
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        return nll.flatten(1).sum(1)
    squared_error = (torch.sigmoid(logits) - x).pow(2).flatten(1)
    return squared_error.sum(1) + squared_error.size(1) * _GAUSSIAN_NLL_CONST


class GenerativeModel(pl.LightningModule):
    """Base class of the AE, VAE and GAN LightningModules.

    Subclasses implement ``step(batch, batch_idx, split) -> metrics`` (a dict
    holding at least the optimised ``loss`` for families that optimise one)
    and may override ``training_step``.
    """

    prog_bar_metrics: tuple[str, ...] = ("loss",)

    def __init__(self, optimizer: OptimizerFactory):
        super().__init__()
        self.optimizer_factory = optimizer
        # Set by genlab.train to the run's resolved config; stored in every
        # checkpoint so a checkpoint alone is enough to rebuild the model.
        self.run_config: dict[str, Any] | None = None

    def step(self, batch: tuple[Tensor, Tensor], batch_idx: int, split: str) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        metrics = self.step(batch, batch_idx, "train")
        self.log_metrics("train", metrics, batch[0].size(0))
        return metrics["loss"]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log_metrics("val", self.step(batch, batch_idx, "val"), batch[0].size(0))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log_metrics("test", self.step(batch, batch_idx, "test"), batch[0].size(0))

    def log_metrics(self, split: str, metrics: dict[str, Tensor], batch_size: int) -> None:
        """Log ``metrics`` as ``split/name``: per step and per epoch in training, per epoch otherwise."""
        shown = {f"{split}/{k}": v for k, v in metrics.items() if k in self.prog_bar_metrics}
        hidden = {f"{split}/{k}": v for k, v in metrics.items() if k not in self.prog_bar_metrics}
        for values, prog_bar in ((shown, True), (hidden, False)):
            if values:
                self.log_dict(
                    values,
                    on_step=split == "train",
                    on_epoch=True,
                    prog_bar=prog_bar,
                    batch_size=batch_size,
                )

    def eval_noise(self, shape: tuple[int, ...], batch_idx: int) -> Tensor:
        """Standard normal noise that is the same for a given batch on every evaluation."""
        generator = torch.Generator(device=self.device).manual_seed(_EVAL_SEED + batch_idx)
        return torch.randn(shape, generator=generator, device=self.device)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config
