"""Model families, one LightningModule each, built from the nets in `genlab.models.nets`."""

from genlab.models.ae import AE
from genlab.models.base import GenerativeModel
from genlab.models.gan import GAN
from genlab.models.vae import VAE

__all__ = ["AE", "GAN", "VAE", "GenerativeModel"]
