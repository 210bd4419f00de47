"""Deterministic autoencoder: x -> z = encoder(x) -> decoder(z), trained on reconstruction."""

from __future__ import annotations

import torch
from torch import Tensor

from genlab.errors import check_choice
from genlab.models.base import (
    RECON_LOSSES,
    GenerativeModel,
    OptimizerFactory,
    SchedulerFactory,
    reconstruction_nll,
)
from genlab.models.nets import MLP, Conv


class AE(GenerativeModel):
    """Autoencoder. Logs ``*/loss`` and ``*/recon`` (equal: -log p(x|z) in nats per image)."""

    metric_names = ("loss", "recon")
    visuals = ("recon", "samples", "latent", "manifold", "traversals")
    fitted_prior = True  # an AE has no prior: codes to decode come from its training codes

    def __init__(
        self,
        net: MLP | Conv,
        optimizer: OptimizerFactory,
        latent_dim: int = 16,
        recon_loss: str = "bce",
        compile: bool = False,
        scheduler: SchedulerFactory | None = None,
    ):
        super().__init__(optimizer, compile, scheduler)
        check_choice("model.recon_loss", recon_loss, RECON_LOSSES)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.latent_dim = latent_dim
        self.recon_loss = recon_loss
        self.encoder = net.encoder(latent_dim)
        self.decoder = net.decoder(latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstructions of ``x`` (pixel means in [0, 1])."""
        return self.decode(self.embed(x))

    def embed(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Images (pixel means in [0, 1]) decoded from codes ``z``."""
        return torch.sigmoid(self.decoder(z))

    def step(self, batch: tuple[Tensor, Tensor], batch_idx: int, split: str) -> dict[str, Tensor]:
        x, _ = batch
        logits = self.decoder(self.encoder(x))
        recon = reconstruction_nll(logits, x, self.recon_loss).mean()
        return {"loss": recon, "recon": recon}
