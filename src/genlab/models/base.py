"""What every model family shares: optimiser config, metric logging,
seeded evaluation noise, and the run config stored in each checkpoint."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.errors import GenlabError, TrainingDiverged

RECON_LOSSES = ("bce", "mse")
# Gaussian decoder with variance 1/2: -log p(x|z) = squared error + this constant per pixel.
_GAUSSIAN_NLL_CONST = 0.5 * math.log(math.pi)
# Evaluation noise comes from its own generator so val/test numbers do not
# depend on how much randomness training consumed.
_EVAL_SEED = 1234
# Checkpoint entry holding the run's resolved config (see `genlab.run.load_model`).
CONFIG_KEY = "genlab_config"
# Checkpoint entry holding the running sums of the current training epoch, so
# that a run resumed mid-epoch still logs the mean over the whole epoch.
_EPOCH_SUMS_KEY = "genlab_epoch_sums"

OptimizerFactory = Callable[..., torch.optim.Optimizer]
# Builds a learning-rate scheduler for an optimiser (a partial torch.optim.lr_scheduler class).
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


# softplus_sum multiplies this many factors in [1/2, 1): at least 2^-112, inside float32's range.
_PRODUCT_GROUP = 112


@torch.no_grad()
def softplus_sum(logits: Tensor) -> Tensor:
    """``F.softplus(logits).sum(-1)`` in about two thirds of the time, for evaluation (no autograd).

    softplus(l) = max(l, 0) - log(sigmoid(|l|)), and the logs of a group of
    sigmoids are taken once, as the log of their product. The importance-
    sampled likelihood spends most of its time here: 784 pixels times
    thousands of samples per image.
    """
    if logits.size(-1) % _PRODUCT_GROUP:
        return F.softplus(logits).sum(-1)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    factors = logits.abs()
    relu_sum = (logits.sum(-1) + factors.sum(-1)) * 0.5
    log_products = factors.sigmoid_().unflatten(-1, (-1, _PRODUCT_GROUP)).prod(-1).log_()
    return relu_sum - log_products.sum(-1)


def reconstruction_nll(logits: Tensor, x: Tensor, recon_loss: str) -> Tensor:
    """-log p(x | z) per example, summed over pixels (the last three dims), in nats.

    ``bce``: Bernoulli decoder on logits (exact for binary data; for grey
    levels it is the usual cross-entropy). ``mse``: Gaussian decoder with mean
    sigmoid(logits) and fixed variance 1/2, i.e. the summed squared error plus
    a constant, so the optimised term is exactly the squared error. ``x``
    broadcasts against ``logits``: logits of shape (B, K, 1, 28, 28) score K
    decodings of each of B images given as (B, 1, 1, 28, 28).
    """
    if recon_loss == "bce" and logits.requires_grad:  # training: torch's fused kernel
        bce = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
        return bce.flatten(-3).sum(-1)
    if recon_loss == "bce":
        # -log Bernoulli(x; sigmoid(l)) = softplus(l) - x * l. Summing x * l as an
        # inner product keeps many decodings of one image cheap (no copies of x).
        logits, x = logits.flatten(-3), x.flatten(-3)
        return softplus_sum(logits) - torch.einsum("...p,...p->...", logits, x)
    squared_error = (torch.sigmoid(logits) - x).pow(2).flatten(-3)
    return squared_error.sum(-1) + squared_error.size(-1) * _GAUSSIAN_NLL_CONST


def _writes_step_logs(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this training step's logged values to the loggers."""
    # Lightning's own test; should its internals change, log every step (slower, same output).
    connector = getattr(trainer, "_logger_connector", None)
    return getattr(connector, "should_update_logs", True)


def _floats(tensors: Iterable[Tensor]) -> list[float]:
    """The values of one-element tensors on one device, as Python floats."""
    tensors = tuple(tensors)
    if tensors and tensors[0].device.type == "cpu":
        # One .item() each: right after a step's large kernels, a stack costs
        # more than the four reads (tens of microseconds per op: cold caches).
        return [t.item() for t in tensors]
    # One copy from a GPU (each copy waits for the device).
    return torch.stack([t.detach() for t in tensors]).tolist()


class _EpochSums:
    """Running sums over examples of one training epoch's metrics, by name.

    Python floats: float64, where a bf16 or float32 sum of 55,000 losses
    would lose digits, and no tensor ops in the training step.
    """

    def __init__(self, sums: dict[str, float] | None = None, count: int = 0):
        self.sums = {name: float(value) for name, value in (sums or {}).items()}
        self.count = count

    def add(self, names: Iterable[str], values: list[float], batch_size: int) -> None:
        sums = self.sums
        for name, value in zip(names, values):
            sums[name] = sums.get(name, 0.0) + value * batch_size
        self.count += batch_size


class GenerativeModel(pl.LightningModule):
    """Base class of the AE, VAE and GAN LightningModules.

    Subclasses implement ``step(batch, batch_idx, split) -> metrics`` (a dict
    holding at least the optimised ``loss`` for families that optimise one),
    declare the names it returns in ``metric_names``, and may override
    ``training_step``.

    ``optimizer`` builds an optimiser from parameters (``model.optimizer``),
    ``scheduler``, when given, a learning-rate scheduler from that optimiser
    (``model.scheduler``, stepped once per epoch).

    Training stops with `TrainingDiverged` as soon as a training metric is
    NaN or infinite, before anything is saved from the broken weights.
    """

    # What `step` returns, logged as train/<name>, val/<name> and test/<name>.
    metric_names: tuple[str, ...] = ("loss",)
    prog_bar_metrics: tuple[str, ...] = ("loss",)
    # The pictures `genlab.callbacks.ImageLogger` draws of this family (see its VISUALS).
    visuals: tuple[str, ...] = ()
    # Where decoded codes come from: N(0, I), the prior (False), or for a family
    # without a prior, a Gaussian fitted to the codes of training images (True).
    fitted_prior: bool = False

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
        # checkpoint so a checkpoint alone is enough to rebuild the model.
        self.run_config: dict[str, Any] | None = None
        self._epoch_sums = _EpochSums()

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning records the hook it is in (_current_fx_name, a string or None)
        # before and after every hook call, about 46 times per training step.
        # nn.Module.__setattr__ first asks whether the value is a parameter or a
        # buffer through Python-level isinstance hooks: 4 us each time, 2% of a
        # seed-VAE epoch on a CPU. A hook's name never is either.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # Two hooks Lightning calls at every training step; each does nothing in the
    # common case but costs 40-60 us of Lightning's checks there (2% of a seed VAE step).
    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # genlab's loaders serve batches from tensors already on the training device.
        if isinstance(batch, tuple) and all(
            isinstance(t, Tensor) and t.device == device for t in batch
        ):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning passes trainer.gradient_clip_val; unset (or 0), nothing is clipped.
        if gradient_clip_val:
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )

    def decode(self, z: Tensor) -> Tensor:
        """Images (pixel means in [0, 1]) decoded or generated from latent codes ``z``."""
        raise NotImplementedError

    def embed(self, x: Tensor) -> Tensor:
        """Latent codes of images ``x`` (families that encode)."""
        raise NotImplementedError

    def rank_latent_dims(self, x: Tensor) -> Tensor:
        """The latent dims in order of how much they carry about ``x``; by default as numbered."""
        return torch.arange(self.hparams.latent_dim)

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
        """Log ``metrics`` as ``split/<name>``: the mean over the epoch's batches.

        Training also logs ``train/<name>_step``, the batch's value, on the
        steps whose values Lightning writes out (every ``trainer.log_every_n_steps``).
        """
        if split != "train":
            self._log(split, metrics, batch_size=batch_size)
            return
        # A self.log call costs about 1 ms of Lightning bookkeeping, as much as
        # a whole training step of a small model, so the epoch means are summed
        # here and Lightning only sees per-step values on the steps it writes out.
        values = _floats(metrics.values())
        self._stop_if_diverged(metrics, values)
        self._epoch_sums.add(metrics, values, batch_size)
        if _writes_step_logs(self.trainer):
            self._log("train", metrics, on_step=True, batch_size=batch_size)

    def _stop_if_diverged(self, metrics: dict[str, Tensor], values: list[float]) -> None:
        # Reading the values is one host-device sync per step: cheap next to a
        # step, and the only way to stop before a checkpoint is written from NaN weights.
        bad = [f"train/{k}={v}" for k, v in zip(metrics, values) if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(
                f"Training diverged: {', '.join(bad)} at epoch {self.current_epoch}, "
                f"step {self.global_step}."
            )

    def on_train_epoch_start(self) -> None:
        self._epoch_sums = _EpochSums()

    def on_train_epoch_end(self) -> None:
        epoch = self._epoch_sums
        if epoch.count:
            # Summed over all processes (DDP), count last, before dividing: the
            # exact mean over every example.
            totals = torch.tensor([*epoch.sums.values(), float(epoch.count)], device=self.device)
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
            means = dict(zip(epoch.sums, totals[:-1] / totals[-1]))
            self._log("train", means, sync_dist=False)

    def _log(
        self, split: str, metrics: dict[str, Tensor], on_step: bool = False, **kwargs: Any
    ) -> None:
        """Log as ``split/<name>`` once per epoch (reduced across devices unless
        ``sync_dist=False``), or as ``split/<name>_step`` for this step."""
        suffix = "_step" if on_step else ""
        # Lightning takes prog_bar per call, so metrics shown in the bar go in a call of their own.
        for prog_bar in (True, False):
            values = {
                f"{split}/{name}{suffix}": value
                for name, value in metrics.items()
                if (name in self.prog_bar_metrics) == prog_bar
            }
            if values:
                self.log_dict(
                    values,
                    on_step=on_step,
                    on_epoch=not on_step,
                    prog_bar=prog_bar,
                    **{"sync_dist": not on_step, **kwargs},
                )

    def eval_noise(self, shape: tuple[int, ...], batch_idx: int) -> Tensor:
        """Standard normal noise that is the same for a given batch on every evaluation."""
        generator = torch.Generator(device=self.device).manual_seed(_EVAL_SEED + batch_idx)
        return torch.randn(shape, generator=generator, device=self.device)

    def configure_model(self) -> None:
        """``model.compile=true``: torch.compile each network, once, when Lightning sets up.

        ``nn.Module.compile`` compiles in place, so parameter names, and with
        them checkpoints, stay as they are. The first steps pay for compiling.
        """
        if self.compile_nets:
            for net in self.children():
                if getattr(net, "_compiled_call_impl", None) is None:
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
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config
        checkpoint[_EPOCH_SUMS_KEY] = {
            "sums": dict(self._epoch_sums.sums),
            "count": self._epoch_sums.count,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A run resumed mid-epoch does not start the epoch again (no
        # on_train_epoch_start): carry on with the sums saved with it.
        saved = checkpoint.get(_EPOCH_SUMS_KEY)
        if saved is not None:
            self._epoch_sums = _EpochSums(saved["sums"], saved["count"])
