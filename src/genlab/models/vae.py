"""Variational autoencoder (Kingma & Welling, 2014) with a beta-weighted KL term (Higgins et al., 2017).

q(z|x) = N(mu(x), diag(sigma(x)^2)), p(z) = N(0, I), p(x|z) Bernoulli on
logits (recon_loss=bce) or Gaussian (mse). The optimised loss is
recon + beta * KL; the true bound -ELBO = recon + KL is logged beside it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genlab.errors import check_choice
from genlab.models.base import (
    RECON_LOSSES,
    GenerativeModel,
    OptimizerFactory,
    reconstruction_nll,
)
from genlab.models.nets import MLP, Conv


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) for every example and latent dim, in nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


class VAE(GenerativeModel):
    """Logs ``*/loss``, ``*/neg_elbo``, ``*/recon`` and ``*/kl``: sums over pixels and
    latent dims, averaged over examples, in nats."""

    metric_names = ("loss", "neg_elbo", "recon", "kl")
    visuals = ("recon", "samples", "latent", "manifold", "traversals", "interpolation")

    def __init__(
        self,
        net: MLP | Conv,
        optimizer: OptimizerFactory,
        latent_dim: int = 16,
        beta: float = 1.0,
        recon_loss: str = "bce",
        kl_warmup_epochs: int = 0,
    ):
        super().__init__(optimizer)
        check_choice("model.recon_loss", recon_loss, RECON_LOSSES)
        self.save_hyperparameters(ignore=["net", "optimizer"], logger=False)
        self.latent_dim = latent_dim
        self.beta = beta
        self.recon_loss = recon_loss
        self.kl_warmup_epochs = kl_warmup_epochs
        self.encoder = net.encoder(2 * latent_dim)
        self.decoder = net.decoder(latent_dim)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z|x)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def forward(self, x: Tensor) -> Tensor:
        """Reconstructions of ``x`` (pixel means in [0, 1]) decoded from the posterior mean."""
        return self.decode(self.embed(x))

    def embed(self, x: Tensor) -> Tensor:
        """Posterior means."""
        return self.encode(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` images (pixel means in [0, 1]) decoded from prior samples."""
        return self.decode(torch.randn(n, self.latent_dim, device=self.device))

    def rank_latent_dims(self, x: Tensor) -> Tensor:
        """Latent dims by their mean KL on ``x``, largest first: the dims the model uses."""
        return kl_to_standard_normal(*self.encode(x)).mean(0).argsort(descending=True)

    def kl_weight(self, epochs_done: float) -> float:
        """beta, ramped linearly from 0 over the first ``kl_warmup_epochs`` epochs of training."""
        if self.kl_warmup_epochs <= 0:
            return self.beta
        return self.beta * min(1.0, epochs_done / self.kl_warmup_epochs)

    def step(self, batch: tuple[Tensor, Tensor], batch_idx: int, split: str) -> dict[str, Tensor]:
        x, _ = batch
        mu, logvar = self.encode(x)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std) if split == "train" else self.eval_noise(std.shape, batch_idx)
        logits = self.decoder(mu + std * eps)

        recon = reconstruction_nll(logits, x, self.recon_loss).mean()
        kl = kl_to_standard_normal(mu, logvar).sum(1).mean()
        metrics = {"neg_elbo": recon + kl, "recon": recon, "kl": kl}
        # Validation and test use the target beta so that val/loss compares
        # epochs on one scale (and picks the best checkpoint) during warm-up.
        beta = self.beta
        if split == "train" and self.kl_warmup_epochs > 0:
            epochs_done = self.current_epoch + batch_idx / max(1, self.trainer.num_training_batches)
            beta = self.kl_weight(epochs_done)
            metrics["kl_weight"] = kl.new_tensor(beta)
        return {"loss": recon + beta * kl, **metrics}
