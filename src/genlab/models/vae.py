"""Variational autoencoder (Kingma & Welling, 2014) with a beta-weighted KL term (Higgins et al., 2017).

q(z|x) = N(mu(x), diag(sigma(x)^2)), p(z) = N(0, I), p(x|z) Bernoulli on
logits (recon_loss=bce), continuous Bernoulli (cbernoulli) or Gaussian (mse). The
optimised loss is recon + beta * KL; the true bound -ELBO = recon + KL is logged
beside it.

With ``iw_samples = k > 1`` the model is an importance-weighted autoencoder (Burda
et al., 2016): it draws k codes per image and optimises the tighter bound
-log mean_k p(x, z_k) / q(z_k|x), logged as ``neg_iw_bound``. The same weights, with
thousands of samples, are how evaluation estimates log p(x)
(`log_importance_weights`).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from genlab.models.base import GenerativeModel, OptimizerFactory, SchedulerFactory
from genlab.models.likelihood import ReconLoss, pixel_mean, reconstruction_nll
from genlab.models.nets import IMAGE_SHAPE, Net, decode_cloud
from genlab.options import Range, checked


class VAE(GenerativeModel):
    """Logs ``*/loss``, ``*/neg_elbo``, ``*/recon`` and ``*/kl`` (and ``*/neg_iw_bound``
    when ``iw_samples > 1``): sums over pixels and latent dims, averaged over examples,
    in nats."""

    metric_names = ("loss", "neg_elbo", "recon", "kl")
    visuals = ("recon", "samples", "latent", "manifold", "traversals", "interpolation")
    code_heads = 2  # the encoder's outputs: means, then log-variances

    @checked("model")
    def __init__(
        self,
        net: Net,
        optimizer: OptimizerFactory,
        latent_dim: Annotated[int, Range(1)] = 16,
        beta: Annotated[float, Range(0)] = 1.0,
        recon_loss: ReconLoss = "bce",
        kl_warmup_epochs: Annotated[int, Range(0)] = 0,
        iw_samples: Annotated[int, Range(1)] = 1,
        compile: bool = False,
        scheduler: SchedulerFactory | None = None,
    ):
        super().__init__(optimizer, compile, scheduler)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.latent_dim = latent_dim
        self.beta = beta
        self.recon_loss = recon_loss
        self.kl_warmup_epochs = kl_warmup_epochs
        self.iw_samples = iw_samples
        if iw_samples > 1:
            self.metric_names = (*type(self).metric_names, "neg_iw_bound")
        self.encoder = net.encoder(2 * latent_dim)
        self.decoder = net.decoder(latent_dim)
        self.set_example_input(*IMAGE_SHAPE)

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
        return pixel_mean(self.decoder(z), self.recon_loss)

    def rank_latent_dims(self, x: Tensor) -> Tensor:
        """Latent dims by their mean KL on ``x``, largest first: the dims the model uses."""
        return self.kl_per_dim(*self.encode(x)).mean(0).argsort(descending=True)

    @staticmethod
    def kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
        """KL(q(z|x) || p(z)) per example and latent dimension, in nats: shape (B, latent_dim)."""
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)

    def elbo_terms(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Per example: -log p(x|z) at z = mu + sigma * eps (one sample of q(z|x)),
        and the KL term per latent dimension; their sums make -ELBO."""
        mu, logvar = self.encode(x)
        logits = self.decoder(mu + torch.exp(0.5 * logvar) * eps)
        return reconstruction_nll(logits, x, self.recon_loss), self.kl_per_dim(mu, logvar)

    def log_importance_weights(
        self, x: Tensor, k: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """log p(x, z) - log q(z|x) for ``k`` samples z ~ q(z|x) of each image: shape (B, k).

        log(mean over k of exp(.)) is, in expectation, a lower bound on log p(x)
        that tightens as k grows (at k = 1 its expectation is the ELBO).
        """
        mu, logvar = self.encode(x)
        eps = torch.randn(x.size(0), k, self.latent_dim, generator=generator, device=x.device)
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
        # Each image's k codes form a tight cloud, which decode_cloud exploits.
        log_px_given_z = -torch.stack(
            [
                reconstruction_nll(decode_cloud(self.decoder, codes), image, self.recon_loss)
                for codes, image in zip(z, x)
            ]
        )
        return log_px_given_z + self._log_prior_over_posterior(z, eps, logvar)

    @staticmethod
    def _log_prior_over_posterior(z: Tensor, eps: Tensor, logvar: Tensor) -> Tensor:
        """log N(z; 0, I) - log N(z; mu, sigma^2) for codes z = mu + sigma * eps of shape
        (B, k, latent_dim): shape (B, k). The log(2 pi) terms cancel."""
        return 0.5 * (eps.pow(2) - z.pow(2) + logvar.unsqueeze(1)).sum(-1)

    def iw_terms(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For codes z_k = mu + sigma * eps[:, k] (``eps``: (B, k, latent_dim)), per image and
        sample: -log p(x|z_k) and log p(z_k) - log q(z_k|x), each (B, k); and the KL term
        per latent dimension, (B, latent_dim). Differentiable: the training objective."""
        mu, logvar = self.encode(x)
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
        logits = self.decoder(z.flatten(0, 1)).unflatten(0, eps.shape[:2])
        recon = reconstruction_nll(logits, x.unsqueeze(1), self.recon_loss)
        return recon, self._log_prior_over_posterior(z, eps, logvar), self.kl_per_dim(mu, logvar)

    def kl_weight(self, epochs_done: float) -> float:
        """beta, ramped linearly from 0 over the first ``kl_warmup_epochs`` epochs of training."""
        if self.kl_warmup_epochs <= 0:
            return self.beta
        return self.beta * min(1.0, epochs_done / self.kl_warmup_epochs)

    def noise_shape(self, batch_size: int) -> tuple[int, ...]:
        """The shape of the standard normal noise `loss_terms` takes for a batch."""
        return (batch_size, self.iw_samples, self.latent_dim)

    def step(self, batch: tuple[Tensor, Tensor], batch_idx: int, split: str) -> dict[str, Tensor]:
        x, _ = batch
        shape = self.noise_shape(x.size(0))
        if split == "train":
            eps = torch.randn(shape, device=self.device)
        else:
            eps = self.eval_noise(shape, batch_idx)
        # Validation and test use the target beta so that val/loss compares
        # epochs on one scale (and picks the best checkpoint) during warm-up.
        if split == "train" and self.kl_warmup_epochs > 0:
            epochs_done = self.current_epoch + batch_idx / max(1, self.trainer.num_training_batches)
            beta = self.kl_weight(epochs_done)
            return {**self.loss_terms(x, eps, beta), "kl_weight": x.new_tensor(beta)}
        return self.loss_terms(x, eps, self.beta)

    def loss_terms(self, x: Tensor, eps: Tensor, beta: float | Tensor) -> dict[str, Tensor]:
        """The metrics of a batch ``x`` with reparameterisation noise ``eps`` (shaped as
        `noise_shape` says) and KL weight ``beta``; ``loss`` is what training minimises."""
        if self.iw_samples == 1:
            recon, kl = self.elbo_terms(x, eps.squeeze(1))
            recon, kl = recon.mean(), kl.sum(1).mean()
            return {"loss": recon + beta * kl, "neg_elbo": recon + kl, "recon": recon, "kl": kl}
        recon, log_prior_ratio, kl = self.iw_terms(x, eps)
        log_k = math.log(self.iw_samples)
        # beta weighs log p(z)/q(z|x) inside each weight: beta = 1 is the IWAE bound itself.
        loss = log_k - torch.logsumexp(log_prior_ratio * beta - recon, dim=1)
        bound = log_k - torch.logsumexp(log_prior_ratio - recon, dim=1)
        # -ELBO as at iw_samples = 1: the reconstruction term averaged over the k codes.
        recon, kl = recon.mean(), kl.sum(1).mean()
        return {
            "loss": loss.mean(),
            "neg_elbo": recon + kl,
            "recon": recon,
            "kl": kl,
            "neg_iw_bound": bound.mean(),
        }
