"""One LightningModule that trains a group of AE or VAE models as one stacked model.

Each training step gathers every member's batch (its own data order), draws every
member's noise from its own generator (seeded as its standalone run seeds it), runs all
members' ``loss_terms`` at once (``torch.func.vmap`` over the stacked parameters), and
takes one backward pass and one optimiser step for the group: each member's gradient
depends only on its own loss, and an elementwise optimiser such as Adam then updates
each member as its own optimiser would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from genlab import private_api
from genlab.data.loader import BatchLoader
from genlab.fused.stack import MemberLayout, Padding, stack, unstack
from genlab.models.base import GenerativeModel, eval_noise
from genlab.models.lean import _EpochSums
from genlab.resume import epoch_seed

# Checkpoint entry of a fused group's own state (split into the members' checkpoints).
FUSED_KEY = "genlab_fused"


class _LossTerms(nn.Module):
    """``model.loss_terms`` as a module call, for `functional_call`: one vector of metrics."""

    def __init__(self, model: GenerativeModel):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, eps: Tensor | None, beta: Tensor) -> Tensor:
        return torch.stack(list(self.model.loss_terms(x, eps, beta).values()))


class _Samplers:
    """Lightning's ``set_epoch`` for the data orders of every member at once."""

    def __init__(self, samplers: Sequence[Any]):
        self.samplers = samplers

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)


class FusedLoader:
    """Training batches for every data order of a group at once: ``(images, labels)`` of
    shape (orders, batch, ...). Lightning sees one `BatchLoader`: its length, ``set_epoch``
    and the resumable state, which all orders share (they advance together)."""

    def __init__(self, loaders: Sequence[BatchLoader]):
        self.loaders = loaders
        self.sampler = _Samplers([loader.sampler for loader in loaders])
        self.batch_sampler = None

    def __len__(self) -> int:
        return len(self.loaders[0])

    def state_dict(self) -> dict[str, int]:
        return self.loaders[0].state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for loader in self.loaders:
            loader.load_state_dict(state)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if len(self.loaders) == 1:  # one order for all: no copy
            for images, labels in self.loaders[0]:
                yield images.unsqueeze(0), labels.unsqueeze(0)
            return
        for batches in zip(*self.loaders):
            yield torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])


class FusedModel(pl.LightningModule):
    """``members`` (AE or VAE models of one family and net, built and initialised as their
    standalone runs build them) trained at once.

    ``noise_seeds``: each member's run seed, from which its training noise is drawn
    epoch by epoch as `genlab.resume.SeedEachEpoch` draws it; ``data_orders``: for each
    member, which of the training loader's orders (one per distinct data seed) it sees.

    Per member it keeps the training metrics' running sums of the epoch
    (``epoch_sums``), the validation means of the last validation (``val_means``), and
    whether it is still training: a member whose loss becomes NaN or infinite is masked
    out of the loss (``diverged`` holds why), and the others go on. As for one model
    (`genlab.models.lean`), the sums stay on the device: on a CPU the host reads them at
    every step, elsewhere only on the steps Lightning writes out, at the epoch's end and
    before a checkpoint is saved, so a member is masked out within
    ``trainer.log_every_n_steps`` steps and never saved from after its NaN.
    """

    # Where the training metrics' flags are read: "host" (every step), "device" (when
    # needed) or "auto" (host on a CPU, else device).
    metric_sums: str = "auto"

    def __init__(
        self,
        members: Sequence[GenerativeModel],
        noise_seeds: Sequence[int],
        data_orders: Sequence[int],
    ):
        super().__init__()
        first = members[0]
        self.size = len(members)
        padded = max(m.hparams.latent_dim for m in members)
        widest = next(m for m in members if m.hparams.latent_dim == padded)
        self.layouts = [
            MemberLayout(m, Padding(m.hparams.latent_dim, padded, first.code_heads))
            for m in members
        ]
        shapes = {name: tuple(p.shape) for name, p in widest.named_parameters()}
        stacked = stack([dict(m.named_parameters()) for m in members], self.layouts, shapes)
        self.names = list(shapes)
        self.stacked = nn.ParameterList(nn.Parameter(stacked[n].detach()) for n in self.names)
        # Not submodules: their own parameters are not trained (``functional_call`` swaps
        # in the stacked ones), and the members are only read for their settings.
        object.__setattr__(self, "_terms", _LossTerms(widest))
        object.__setattr__(self, "members", list(members))
        self.padded_dim = padded
        self.noise_seeds = list(noise_seeds)
        self.data_orders = list(data_orders)
        self.metric_names = list(first.metric_names)
        self.alive = [True] * self.size
        self.diverged: dict[int, str] = {}
        # The epoch's training sums, (members, metrics), on the training device: a step adds
        # to them without waiting for the device; the host reads them when it needs them.
        self._sums: Tensor | None = None
        self._bad: Tensor | None = None  # which sums met a NaN or infinite value
        self._count = 0
        self._kl_weights = [0.0] * self.size  # host sums of the warm-up's weight
        self._saved_sums: list[dict[str, Any]] = []
        self.val_means: list[dict[str, float]] = [{} for _ in members]
        self.validated_epoch: int | None = None  # the epoch of the last validation
        self._val_sums = [_EpochSums() for _ in members]
        self.generators: list[torch.Generator] = []
        self._saved_generators: list[Tensor] = []
        # The last training step's metrics per member (as logged), and the step under which
        # Lightning writes step logs when that step is one it writes, else None.
        self.last_values: list[list[float]] = [[] for _ in members]
        self.step_logged: int | None = None

    # -- the members' own weights -------------------------------------------------------------

    def member_weights(
        self, index: int, stacked: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Member ``index``'s weights, named and shaped as in its own model."""
        if stacked is None:
            stacked = {n: p.detach() for n, p in zip(self.names, self.stacked)}
        return unstack(stacked, self.layouts[index], index)

    def set_member_weights(self, index: int, weights: dict[str, Tensor]) -> None:
        """Put member ``index``'s own weights (e.g. its best checkpoint's) in its slot."""
        with torch.no_grad():
            for name, param in zip(self.names, self.stacked):
                param[index] = self.layouts[index].pad(name, weights[name], param.shape[1:])

    def materialise(self, index: int) -> GenerativeModel:
        """Member ``index`` as its own model, holding its current weights."""
        model = self.members[index]
        model.load_state_dict(self.member_weights(index), strict=False)
        return model.to(self.device)

    # -- the step ------------------------------------------------------------------------------

    def _metrics(self, x: Tensor, x_dims: int | None, eps: Tensor | None, beta: Tensor) -> Tensor:
        """Every member's metrics (``loss_terms`` values, in order): shape (members, names)."""
        params = {f"model.{n}": p for n, p in zip(self.names, self.stacked)}

        def one(params: dict[str, Tensor], x: Tensor, eps: Tensor | None, beta: Tensor) -> Tensor:
            return functional_call(self._terms, params, (x, eps, beta))

        eps_dims = None if eps is None else 0
        return vmap(one, in_dims=(0, x_dims, eps_dims, 0))(params, x, eps, beta)

    def _noise(self, batch_size: int, draw: Any) -> Tensor | None:
        """Each member's noise, drawn by ``draw(member index, shape)``, zero-padded."""
        shapes = [m.noise_shape(batch_size) for m in self.members]
        if shapes[0] is None:
            return None
        eps = torch.zeros(self.size, *shapes[0][:-1], self.padded_dim, device=self.device)
        for i, shape in enumerate(shapes):
            eps[i, ..., : shape[-1]] = draw(i, shape)
        return eps

    def _host_betas(self, epochs_done: float | None) -> list[float]:
        """Each member's KL weight: its beta, or its warm-up's weight in training."""
        betas = []
        for m in self.members:
            beta = getattr(m, "beta", 0.0)
            if epochs_done is not None and getattr(m, "kl_warmup_epochs", 0) > 0:
                beta = m.kl_weight(epochs_done)
            betas.append(float(beta))
        return betas

    def on_train_epoch_start(self) -> None:
        self.generators = self._seeded_generators(self.current_epoch)
        self._start_sums()

    def _start_sums(self, saved: list[dict[str, Any]] | None = None) -> None:
        """Zero the epoch's sums, or set them to ``saved`` (`epoch_sums`' form)."""
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        shape = (self.size, len(self.metric_names))
        self._sums = torch.zeros(shape, dtype=dtype, device=self.device)
        self._bad = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self._count, self._kl_weights = 0, [0.0] * self.size
        if saved:
            rows = [[s["sums"].get(n, 0.0) for n in self.metric_names] for s in saved]
            self._sums.copy_(torch.tensor(rows, dtype=dtype))
            self._count = max(int(s["count"]) for s in saved)
            self._kl_weights = [float(s["sums"].get("kl_weight", 0.0)) for s in saved]

    def epoch_sums(self) -> list[_EpochSums]:
        """Each member's training sums of the epoch so far, by metric name (one read)."""
        rows = self._sums.tolist() if self._sums is not None else [[] for _ in self.members]
        sums = []
        for i, row in enumerate(rows):
            named = dict(zip(self.metric_names, row))
            if len(self.member_metric_names(i)) > len(self.metric_names):
                named["kl_weight"] = self._kl_weights[i]
            sums.append(_EpochSums(named, self._count))
        return sums

    def _sums_on_device(self) -> bool:
        if self.metric_sums == "auto":
            return self.device.type != "cpu"
        return self.metric_sums == "device"

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        images = batch[0]
        if images.size(0) == 1:  # one data order: every member sees the same batch
            x, x_dims = images[0], None
        else:
            x, x_dims = images.index_select(0, self._orders), 0
        batch_size = images.size(1)
        gens = self.generators
        eps = self._noise(
            batch_size, lambda i, shape: torch.randn(shape, generator=gens[i], device=self.device)
        )
        epochs_done = self.current_epoch + batch_idx / max(1, self.trainer.num_training_batches)
        betas = self._host_betas(epochs_done)
        values = self._metrics(
            x, x_dims, eps, self._target_betas * self._warmup_weights(epochs_done)
        )
        self._add_training(values.detach(), betas, batch_size)
        writes = private_api.writes_step_logs(self.trainer)
        self.step_logged = private_api.logged_step(self.trainer) if writes else None
        if writes or not self._sums_on_device() or self.trainer.is_last_batch:
            self._read(values.detach(), betas)
        if not any(self.alive):
            self.trainer.should_stop = True
            return None  # nothing left to train: Lightning skips the step
        # A member found diverged only later adds NaN here, but a sum's gradient reaches
        # every member as 1 whatever the others' values: the others train on unharmed.
        return torch.where(self._alive_mask, values[:, 0], 0.0).sum()

    def _warmup_weights(self, epochs_done: float) -> Tensor:
        """Each member's share of its beta now: 1, or its warm-up's ramp (on the device)."""
        ramp = (epochs_done / self._warmup_epochs.clamp(min=1)).clamp(max=1.0)
        return torch.where(self._warmup_epochs > 0, ramp, 1.0)

    def _add_training(self, values: Tensor, betas: list[float], batch_size: int) -> None:
        """Add a step's metrics to the epoch's sums, without reading them."""
        self._sums.add_(values.to(self._sums.dtype), alpha=batch_size)
        self._bad.logical_or_(~torch.isfinite(values))
        self._count += batch_size
        for i, beta in enumerate(betas):
            self._kl_weights[i] += beta * batch_size

    def _read(self, values: Tensor | None = None, betas: list[float] | None = None) -> None:
        """Read the NaN flags (and this step's ``values``, for the step logs): a member with
        a NaN or infinite metric since the epoch began is masked out from now on."""
        bad = self._bad.tolist() if self._bad is not None else []
        rows = values.tolist() if values is not None else None
        for i, flags in enumerate(bad):
            if rows is not None:
                row = rows[i]
                if len(self.member_metric_names(i)) > len(row):
                    row = [*row, betas[i]]
                self.last_values[i] = row
            if not (self.alive[i] and any(flags)):
                continue
            self.alive[i] = False
            self._alive_mask[i] = False
            if rows is not None and not self._sums_on_device():  # read at every step: this one
                named = zip(self.metric_names, rows[i])
                what = ", ".join(f"train/{n}={v}" for n, v in named if not math.isfinite(v))
                self.diverged[i] = (
                    f"Training diverged: {what} at epoch {self.current_epoch}, "
                    f"step {self.global_step}."
                )
            else:
                names = ", ".join(f"train/{n}" for n, f in zip(self.metric_names, flags) if f)
                self.diverged[i] = (
                    f"Training diverged: {names} became NaN or infinite in epoch "
                    f"{self.current_epoch}, by step {self.global_step}."
                )

    def member_metric_names(self, index: int) -> list[str]:
        """The training metrics member ``index`` logs (``kl_weight`` during a warm-up)."""
        warmup = getattr(self.members[index], "kl_warmup_epochs", 0) > 0
        return [*self.metric_names, "kl_weight"] if warmup else self.metric_names

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_batch(self, x: Tensor, batch_idx: int) -> Tensor:
        """Every member's metrics on an evaluation batch, with the evaluation noise its
        own model draws (`genlab.models.base.eval_noise`) and its target beta."""
        cache: dict[tuple[int, ...], Tensor] = {}

        def draw(i: int, shape: tuple[int, ...]) -> Tensor:
            if shape not in cache:
                cache[shape] = eval_noise(shape, batch_idx, self.device)
            return cache[shape]

        return self._metrics(x, None, self._noise(x.size(0), draw), self._target_betas)

    def evaluate(self, loader: BatchLoader, batches: int | None = None) -> list[dict[str, float]]:
        """Each member's means over ``loader``'s first ``batches`` batches (None: all), by
        metric name."""
        sums = [_EpochSums() for _ in range(self.size)]
        for batch_idx, (x, _) in enumerate(loader):
            if batches is not None and batch_idx >= batches:
                break
            self._add(sums, self.evaluate_batch(x.to(self.device), batch_idx), x.size(0))
        return [{n: v / s.count for n, v in s.sums.items()} for s in sums]

    def _add(self, sums: list[_EpochSums], values: Tensor, batch_size: int) -> None:
        for s, row in zip(sums, values.tolist()):
            s.add(self.metric_names, row, batch_size)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = [_EpochSums() for _ in range(self.size)]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._add(self._val_sums, self.evaluate_batch(batch[0], batch_idx), batch[0].size(0))

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_epoch = self.current_epoch
            self.val_means = [
                {n: v / s.count for n, v in s.sums.items()} if s.count else {}
                for s in self._val_sums
            ]

    # -- optimiser and checkpoints -----------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        first = self.members[0]
        optimizer = first.optimizer_factory(self.parameters())
        if first.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": first.build_scheduler(optimizer)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._read()  # a member that diverged since the last look is not saved
        self._check_weights()
        checkpoint[FUSED_KEY] = {
            "generators": [g.get_state() for g in self.generators],
            "epoch_sums": [{"sums": dict(s.sums), "count": s.count} for s in self.epoch_sums()],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A group resumed mid-epoch does not start the epoch again (no on_train_epoch_start):
        # its noise streams and sums go on from the checkpoint's.
        state = checkpoint.get(FUSED_KEY, {})
        self._saved_generators = list(state.get("generators", []))
        self._saved_sums = list(state.get("epoch_sums", []))

    def on_fit_start(self) -> None:
        # Here, not on loading: the model is on its device only now, and this comes before
        # the sanity check, in which a stop already saves. (Without saved streams, a group
        # resumed mid-epoch draws the rest of the epoch's noise afresh.)
        device = self.device
        self.generators = self._seeded_generators(self.current_epoch)
        for generator, saved in zip(self.generators, self._saved_generators):
            generator.set_state(saved)
        self._saved_generators = []
        self._orders = torch.tensor(self.data_orders, device=device)
        self._alive_mask = torch.tensor(self.alive, device=device)
        self._target_betas = torch.tensor(self._host_betas(None), device=device)
        warmups = [getattr(m, "kl_warmup_epochs", 0) for m in self.members]
        self._warmup_epochs = torch.tensor(warmups, dtype=torch.float32, device=device)
        self._start_sums(self._saved_sums)  # a group resumed mid-epoch goes on with its sums
        self._saved_sums = []

    def _check_weights(self) -> None:
        """Mask out a member whose weights became NaN or infinite (a finite loss with an
        infinite gradient does that): it is then never saved from them."""
        finite = torch.ones(self.size, dtype=torch.bool, device=self.device)
        for param in self.stacked:
            finite &= torch.isfinite(param.detach().flatten(1)).all(1)
        for i, ok in enumerate(finite.tolist()):
            if self.alive[i] and not ok:
                self.alive[i] = False
                self._alive_mask[i] = False
                self.diverged[i] = (
                    f"Training diverged: its weights became NaN or infinite in epoch "
                    f"{self.current_epoch}, by step {self.global_step}."
                )

    def _seeded_generators(self, epoch: int) -> list[torch.Generator]:
        """Each member's noise stream of ``epoch``, seeded as `SeedEachEpoch` seeds it."""
        return [
            torch.Generator(device=self.device).manual_seed(epoch_seed(seed, epoch))
            for seed in self.noise_seeds
        ]
