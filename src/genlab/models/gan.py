"""Generative adversarial network (Goodfellow et al., 2014) with the non-saturating generator loss.

The generator is the net's decoder (latent -> image logits, squashed to
[0, 1] by a sigmoid); the discriminator is the net's encoder with one output
logit. Both are trained with their own Adam optimiser, one step each per batch.
With ``ema_decay``, samples come from an exponential moving average of the
generator's weights (Yazici et al., 2019), which smooths out the oscillation of
adversarial training.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.models.base import GenerativeModel, OptimizerFactory, SchedulerFactory
from genlab.models.nets import Net
from genlab.options import Range, checked


def _bce(logits: Tensor, target: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


class GAN(GenerativeModel):
    """Logs ``*/d_loss``, ``*/g_loss``, ``*/d_real`` (mean D(x)) and ``*/d_fake`` (mean D(G(z))).

    A GAN has no validation loss that ranks checkpoints, so its runs keep
    ``last.ckpt`` only. Each batch takes two optimiser steps, so Lightning's
    ``global_step`` (and ``max_steps``) counts twice the number of batches.

    ``ema_decay`` (e.g. 0.999): keep ``generator_ema``, after every generator step
    ``ema = decay * ema + (1 - decay) * generator`` for its weights and batch-norm
    statistics, and draw every sample, picture and evaluation from it. Its horizon is
    about 1 / (1 - decay) steps: a run much shorter than that samples from a generator
    still close to its initial weights.
    The ``val/`` and ``test/`` discriminator numbers score its fakes too; training, the live one's.
    """

    metric_names = ("d_loss", "g_loss", "d_real", "d_fake")
    prog_bar_metrics = ("d_loss", "g_loss")
    visuals = ("samples", "interpolation")

    @checked("model")
    def __init__(
        self,
        net: Net,
        optimizer: OptimizerFactory,
        latent_dim: Annotated[int, Range(1)] = 64,
        ema_decay: Annotated[float, Range(0, 1, exclusive=True)] | None = None,
        compile: bool = False,
        scheduler: SchedulerFactory | None = None,
    ):
        super().__init__(optimizer, compile, scheduler)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.automatic_optimization = False
        self.latent_dim = latent_dim
        self.generator = net.decoder(latent_dim)
        self.discriminator = net.encoder(1)
        self.ema_decay = ema_decay
        self.generator_ema = None
        if ema_decay is not None:
            self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        self.set_example_input(latent_dim)

    def forward(self, z: Tensor) -> Tensor:
        """Images (pixel values in [0, 1]) generated from latent codes ``z``."""
        return self.decode(z)

    def decode(self, z: Tensor) -> Tensor:
        """Images from ``z``: by the averaged generator when there is one."""
        generator = self.generator if self.generator_ema is None else self.generator_ema
        return torch.sigmoid(generator(z))

    @torch.no_grad()
    def update_ema(self) -> None:
        """One step of the generator's moving average: its weights and its batch-norm
        statistics alike, so that the statistics belong to the averaged weights' activations
        rather than to the live generator's (counters are copied)."""
        ema, live = self.generator_ema, self.generator
        for averaged, current in zip(ema.parameters(), live.parameters()):
            averaged.lerp_(current, 1.0 - self.ema_decay)
        for averaged, current in zip(ema.buffers(), live.buffers()):
            if averaged.is_floating_point():
                averaged.lerp_(current, 1.0 - self.ema_decay)
            else:
                averaged.copy_(current)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        # The live generator: the one the optimiser trains.
        fake = torch.sigmoid(
            self.generator(torch.randn(x.size(0), self.latent_dim, device=self.device))
        )

        # Discriminator: real -> 1, fake -> 0.
        self.toggle_optimizer(opt_d)
        real_logits = self.discriminator(x)
        fake_logits = self.discriminator(fake.detach())
        d_loss = _bce(real_logits, 1.0) + _bce(fake_logits, 0.0)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        # Generator, non-saturating: maximise log D(G(z)) rather than minimise log(1 - D(G(z))).
        self.toggle_optimizer(opt_g)
        g_loss = _bce(self.discriminator(fake), 1.0)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        if self.generator_ema is not None:
            self.update_ema()

        metrics = {
            "d_loss": d_loss.detach(),
            "g_loss": g_loss.detach(),
            "d_real": torch.sigmoid(real_logits).mean().detach(),
            "d_fake": torch.sigmoid(fake_logits).mean().detach(),
        }
        self.log_metrics("train", metrics, x.size(0))

    def step(self, batch: tuple[Tensor, Tensor], batch_idx: int, split: str) -> dict[str, Tensor]:
        x, _ = batch
        z = self.eval_noise((x.size(0), self.latent_dim), batch_idx)
        real_logits = self.discriminator(x)
        fake_logits = self.discriminator(self(z))
        return {
            "d_loss": _bce(real_logits, 1.0) + _bce(fake_logits, 0.0),
            "g_loss": _bce(fake_logits, 1.0),
            "d_real": torch.sigmoid(real_logits).mean(),
            "d_fake": torch.sigmoid(fake_logits).mean(),
        }

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # Manual optimisation: Lightning leaves the schedulers to us.
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.step()

    def configure_optimizers(self) -> Any:
        optimizers = [
            self.optimizer_factory(self.generator.parameters()),
            self.optimizer_factory(self.discriminator.parameters()),
        ]
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [self.build_scheduler(optimizer) for optimizer in optimizers]
