"""genlab: configuration-driven experiments with autoencoders, VAEs and GANs."""

__version__ = "0.1.0"
