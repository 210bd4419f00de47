"""The contract of a model family: what AE, VAE and GAN implement and declare, and what
every genlab model does the same way (optimisers, evaluation noise, its run config in
every checkpoint)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from genlab import private_api
from genlab.errors import GenlabError
from genlab.models.lean import LeanLightningModule

# Checkpoint entry holding the run's resolved config (see `genlab.checkpoints.load_model`).
CONFIG_KEY = "genlab_config"
# Evaluation noise comes from its own generator so val/test numbers do not
# depend on how much randomness training consumed.
_EVAL_SEED = 1234
# Images encoded at once when a whole split is encoded: bounds a conv encoder's memory.
_EMBED_CHUNK = 1000

OptimizerFactory = Callable[..., torch.optim.Optimizer]
# Builds a learning-rate scheduler for an optimiser (a partial torch.optim.lr_scheduler class).
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def eval_noise(shape: tuple[int, ...], batch_idx: int, device: torch.device) -> Tensor:
    """The noise of validation and test batch ``batch_idx``: the same at every evaluation."""
    generator = torch.Generator(device=device).manual_seed(_EVAL_SEED + batch_idx)
    return torch.randn(shape, generator=generator, device=device)


class GenerativeModel(LeanLightningModule):
    """Base class of the model families.

    A family implements:

    - ``step(batch, batch_idx, split)``: its metrics on a batch, the optimised ``loss``
      among them, written out (``training_step`` calls it; a family that steps its own
      optimisers overrides ``training_step``); AE and VAE compute them in
      ``loss_terms(x, eps, beta)`` from noise of ``noise_shape(batch_size)``, which a fused
      sweep (`genlab.fused`) calls for many models at once;
    - ``decode(z)``: images in [0, 1] from latent codes; ``embed(x)``: codes of images,
      for families with an encoder;
    - ``code_gaussian(fit_images)``, when it has no prior (``fitted_prior = True``).

    and declares the names ``step`` returns (``metric_names``, logged as ``train/<name>``,
    ``val/<name>`` and ``test/<name>``) and the pictures it supports (``visuals``, drawn
    by `genlab.callbacks.ImageLogger`).

    ``optimizer`` builds an optimiser from parameters (``model.optimizer``), ``scheduler``,
    when given, a learning-rate scheduler from that optimiser (``model.scheduler``,
    stepped once per epoch).
    """

    metric_names: tuple[str, ...] = ("loss",)
    visuals: tuple[str, ...] = ()
    # False: samples decode codes of the prior N(0, I). True (a family without a prior):
    # codes of a diagonal Gaussian fitted to the codes of training images.
    fitted_prior: bool = False
    # How many blocks of latent_dim outputs the encoder ends in (a VAE's: mean and
    # log-variance); a fused sweep pads each block to the group's largest latent size.
    code_heads: int = 1

    def __init__(
        self,
        optimizer: OptimizerFactory,
        compile: bool = False,
        scheduler: SchedulerFactory | None = None,
    ):
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.compile_nets = compile
        # Set by genlab.train to the run's resolved config; stored in every
        # checkpoint so that a checkpoint alone is enough to rebuild the model.
        self.run_config: dict[str, Any] | None = None

    # -- what a family implements -----------------------------------------------------------

    def step(self, batch: tuple[Tensor, Tensor], batch_idx: int, split: str) -> dict[str, Tensor]:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        """Images (pixel means in [0, 1]) decoded or generated from latent codes ``z``."""
        raise NotImplementedError

    def embed(self, x: Tensor) -> Tensor:
        """Latent codes of images ``x`` (families that encode)."""
        raise NotImplementedError

    def rank_latent_dims(self, x: Tensor) -> Tensor:
        """The latent dims in order of how much they carry about ``x``; by default as numbered."""
        return torch.arange(self.hparams.latent_dim)

    def code_gaussian(self, fit_images: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of the diagonal Gaussian whose codes ``sample``
        decodes: the prior N(0, I). A family without a prior fits it to the codes of
        ``fit_images`` instead."""
        ones = torch.ones(self.hparams.latent_dim, device=self.device)
        return torch.zeros_like(ones), ones

    # -- what every family shares -------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        gaussian: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``n`` images decoded from codes drawn from ``gaussian`` (mean, std), by default
        `code_gaussian`, with noise from ``generator`` (drawn on its device)."""
        mean, std = gaussian if gaussian is not None else self.code_gaussian()
        device = generator.device if generator is not None else self.device
        eps = torch.randn(n, len(mean), generator=generator, device=device).to(self.device)
        return self.decode(mean + std * eps)

    @torch.no_grad()
    def embed_all(self, images: Tensor) -> Tensor:
        """``embed`` of any number of images, encoded in chunks to bound memory."""
        return torch.cat([self.embed(chunk) for chunk in images.split(_EMBED_CHUNK)])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        metrics = self.step(batch, batch_idx, "train")
        self.log_metrics("train", metrics, batch[0].size(0))
        return metrics["loss"]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log_metrics("val", self.step(batch, batch_idx, "val"), batch[0].size(0))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log_metrics("test", self.step(batch, batch_idx, "test"), batch[0].size(0))

    def eval_noise(self, shape: tuple[int, ...], batch_idx: int) -> Tensor:
        """Standard normal noise that is the same for a given batch on every evaluation."""
        return eval_noise(shape, batch_idx, self.device)

    def set_example_input(self, *shape: int) -> None:
        """One input of ``forward``'s shape, for Lightning's model summary to count the FLOPs
        of one example (left out with ``compile``: it would compile for a batch of one)."""
        if not self.compile_nets:
            self.example_input_array = torch.zeros(1, *shape)

    def configure_model(self) -> None:
        """``model.compile=true``: torch.compile each network in place (parameter names,
        and with them checkpoints, stay as they are), once, when Lightning sets up."""
        if self.compile_nets:
            for net in self.children():
                if not private_api.is_compiled(net):
                    net.compile()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        # Stepped by Lightning once per epoch; its state is saved with the checkpoint.
        return {"optimizer": optimizer, "lr_scheduler": self.build_scheduler(optimizer)}

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """``model.scheduler`` for ``optimizer``; a missing argument is a config error."""
        try:
            return self.scheduler_factory(optimizer)
        except TypeError as err:
            name = getattr(self.scheduler_factory, "func", self.scheduler_factory)
            raise GenlabError(
                f"model.scheduler ({name.__name__}) could not be built: {err}. Add the missing "
                f"option as model.scheduler.<option>=<value>, or train without a schedule: "
                f"model.scheduler=null."
            ) from err

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config
