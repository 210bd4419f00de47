"""Deterministic autoencoder: x -> z = encoder(x) -> decoder(z), trained on reconstruction."""

from __future__ import annotations

from typing import Annotated

from torch import Tensor

from genlab.errors import GenlabError
from genlab.models.base import GenerativeModel, OptimizerFactory, SchedulerFactory
from genlab.models.likelihood import ReconLoss, pixel_mean, reconstruction_nll
from genlab.models.nets import IMAGE_SHAPE, Net
from genlab.options import Range, checked


class AE(GenerativeModel):
    """Autoencoder. Logs ``*/loss`` and ``*/recon`` (equal: -log p(x|z) in nats per image)."""

    metric_names = ("loss", "recon")
    visuals = ("recon", "samples", "latent", "manifold", "traversals")
    fitted_prior = True  # an AE has no prior: codes to decode come from its training codes

    @checked("model")
    def __init__(
        self,
        net: Net,
        optimizer: OptimizerFactory,
        latent_dim: Annotated[int, Range(1)] = 16,
        recon_loss: ReconLoss = "bce",
        compile: bool = False,
        scheduler: SchedulerFactory | None = None,
    ):
        super().__init__(optimizer, compile, scheduler)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.latent_dim = latent_dim
        self.recon_loss = recon_loss
        self.encoder = net.encoder(latent_dim)
        self.decoder = net.decoder(latent_dim)
        self.set_example_input(*IMAGE_SHAPE)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstructions of ``x`` (pixel means in [0, 1])."""
        return self.decode(self.embed(x))

    def embed(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Images (pixel means in [0, 1]) decoded from codes ``z``."""
        return pixel_mean(self.decoder(z), self.recon_loss)

    def code_gaussian(self, fit_images: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The diagonal Gaussian of the codes of ``fit_images`` (training images): mean and
        standard deviation per latent dim."""
        if fit_images is None:
            raise GenlabError(
                "An AE has no prior: its samples decode codes of a Gaussian fitted to the codes "
                "of training images, so code_gaussian (and sample) need fit_images."
            )
        codes = self.embed_all(fit_images)
        return codes.mean(0), codes.std(0)

    def noise_shape(self, batch_size: int) -> None:
        """An AE's loss draws no noise."""

    def step(self, batch: tuple[Tensor, Tensor], batch_idx: int, split: str) -> dict[str, Tensor]:
        return self.loss_terms(batch[0])

    def loss_terms(
        self, x: Tensor, eps: Tensor | None = None, beta: float | Tensor | None = None
    ) -> dict[str, Tensor]:
        """The metrics of a batch ``x`` (``eps`` and ``beta``: none for an AE)."""
        logits = self.decoder(self.encoder(x))
        recon = reconstruction_nll(logits, x, self.recon_loss).mean()
        return {"loss": recon, "recon": recon}
