"""A fused group: several jobs of a sweep trained as one `FusedModel` in one process, each
still written as a complete run of its own.

Each job's folder gets what its standalone run writes: ``.hydra/``, environment.json,
TensorBoard events (scalars, pictures, HParams), images/, metrics.json and checkpoints
in the standalone format (the member's own weights, optimiser state, loop state and
random stream), which ``genlab-eval``, ``load_model`` and ``resume=last`` read like any
other. The group's checkpoints are never written as such: `MemberCheckpointIO` splits
each into one per job, and joins them again to resume the group.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from genlab import private_api, runtime
from genlab.callbacks import write_hparams
from genlab.checkpoints import (
    AtomicCheckpointIO,
    LastCheckpoint,
    check_resumable,
    load_weights,
    read_checkpoint,
)
from genlab.config.validate import check_training_setup
from genlab.errors import Interrupted
from genlab.evaluate import evaluate_model
from genlab.fused.model import FUSED_KEY, FusedLoader, FusedModel
from genlab.fused.stack import stack
from genlab.interrupts import StopSignals
from genlab.models.base import CONFIG_KEY, GenerativeModel
from genlab.resume import SeedEachEpoch, mark_restart, resume_checkpoint, rng_state
from genlab.rundir import LAST_CHECKPOINT, METRICS_FILE, record_run, write_metrics
from genlab.train import (
    _build_trainer,
    _quiet_third_party_noise,
    record_diverged,
    record_interrupted,
)

log = logging.getLogger(__name__)

# Where the group's own checkpoint paths point: never written, split per job instead.
GROUP_CHECKPOINTS = ".fused"
# Checkpoint entries the group and each of its jobs hold alike.
_SHARED_STATE = ("epoch", "global_step", "pytorch-lightning_version", "loops", "lr_schedulers")


@dataclass
class Member:
    """One job of a fused group.

    ``cfg`` is its config resolved (what its objects are built from), ``composed`` the
    same as composed, interpolations kept (its ``.hydra/config.yaml``), ``hydra_cfg`` its
    Hydra settings, ``run_config`` the sections a checkpoint keeps (see `genlab.train`),
    ``everything`` the whole resolved config as plain values.
    ``resume``: continue it from its last.ckpt.
    """

    cfg: DictConfig
    composed: DictConfig
    hydra_cfg: DictConfig | None
    run_config: dict[str, Any]
    everything: dict[str, Any] = field(default_factory=dict, repr=False)
    resume: bool = False
    # Filled in while the group trains.
    model: GenerativeModel | None = None
    logger: Any = None
    images: Any = None
    ranking: ModelCheckpoint | None = None
    metrics: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.paths.output_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.paths.checkpoint_dir)

    @property
    def job(self) -> str:
        return self.output_dir.name

    @property
    def writers(self) -> list[Any]:
        experiment = getattr(self.logger, "experiment", None)
        return [experiment] if hasattr(experiment, "add_scalar") else []


class MemberCheckpointIO(AtomicCheckpointIO):
    """Writes a group's checkpoint as one checkpoint per job: ``<group>/.fused/last.ckpt``
    becomes every training job's ``checkpoints/last.ckpt``. Reading the group's path joins
    the jobs' last.ckpt files."""

    def __init__(self, runs: FusedRuns):
        super().__init__()
        self.runs = runs

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        for index in self.runs.training():
            member_path = self.runs.members[index].checkpoint_dir / Path(path).name
            member_path.parent.mkdir(parents=True, exist_ok=True)
            self.write(self.runs.member_checkpoint(checkpoint, index), member_path)

    def write(self, checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
        """Write one job's ``checkpoint`` to ``path``, atomically, with its weights' hash."""
        super().save_checkpoint(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: Any = None
    ) -> dict[str, Any]:
        return self.runs.joined_checkpoint()

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        Path(path).unlink(missing_ok=True)


class FusedRuns(pl.Callback):
    """The jobs of a group as runs of their own: their loggers, pictures, best
    checkpoints, console lines and records, kept from the group's training loop."""

    def __init__(self, members: list[Member], group_dir: Path, start: float):
        self.members = members
        self.group_dir = group_dir
        self.start = start
        self.model: FusedModel | None = None
        self.datamodule: Any = None
        self.device = torch.device("cpu")  # the training device, once the trainer is built
        self._recorded: set[int] = set()  # members whose stop is already in metrics.json
        self._restart_pending = any(m.resume for m in members)

    # -- which members ----------------------------------------------------------------------------

    def training(self) -> list[int]:
        """The members still training (not diverged)."""
        return [i for i, alive in enumerate(self.model.alive) if alive]

    # -- checkpoints: split and joined ------------------------------------------------------------

    def member_checkpoint(self, fused: dict[str, Any], index: int) -> dict[str, Any]:
        """Member ``index``'s checkpoint, as its standalone run writes it, out of the group's."""
        model, member = self.model, self.members[index]
        checkpoint = {key: copy.deepcopy(fused[key]) for key in _SHARED_STATE if key in fused}
        stacked = {n: fused["state_dict"][f"stacked.{j}"] for j, n in enumerate(model.names)}
        checkpoint["state_dict"] = model.member_weights(index, stacked)
        checkpoint["optimizer_states"] = [
            self._member_optimizer(state, index) for state in fused.get("optimizer_states", [])
        ]
        own = fused[FUSED_KEY]
        # The member's noise stream where its standalone run keeps it: the global generator
        # that SeedEachEpoch saves.
        randomness = rng_state()
        if self.device.type == "cuda":
            randomness["cuda"][self.device.index or 0] = own["generators"][index]
        elif self.device.type == "cpu":
            randomness["torch"] = own["generators"][index]
        # (Elsewhere, e.g. MPS, the standalone run keeps no stream of its own to continue.)
        callbacks = {SeedEachEpoch(0).state_key: randomness}
        if member.ranking is not None:
            callbacks[member.ranking.state_key] = member.ranking.state_dict()
        checkpoint["callbacks"] = callbacks
        checkpoint["hparams_name"] = getattr(member.model, "_hparams_name", "kwargs")
        checkpoint["hyper_parameters"] = dict(member.model.hparams)
        checkpoint[CONFIG_KEY] = member.run_config
        checkpoint["genlab_epoch_sums"] = own["epoch_sums"][index]
        return checkpoint

    def _member_optimizer(self, state: dict[str, Any], index: int) -> dict[str, Any]:
        model = self.model
        per_param = {}
        for j, values in state["state"].items():
            stacked_shape = model.stacked[j].shape
            per_param[j] = {
                key: model.layouts[index].unpad(model.names[j], value[index])
                if torch.is_tensor(value) and value.shape == stacked_shape
                else copy.deepcopy(value)
                for key, value in values.items()
            }
        return {"state": per_param, "param_groups": copy.deepcopy(state["param_groups"])}

    def joined_checkpoint(self) -> dict[str, Any]:
        """The group's checkpoint, joined from its members' last.ckpt (read at set-up)."""
        model = self.model
        saved = [m.checkpoint for m in self.members]
        first = saved[0]
        fused = {key: first[key] for key in _SHARED_STATE if key in first}
        shapes = {n: tuple(p.shape[1:]) for n, p in zip(model.names, model.stacked)}
        stacked = stack([c["state_dict"] for c in saved], model.layouts, shapes)
        fused["state_dict"] = {f"stacked.{j}": stacked[n] for j, n in enumerate(model.names)}
        optimizers = []
        for k, group_state in enumerate(first["optimizer_states"]):
            per_param = {}
            for j, values in group_state["state"].items():
                name = model.names[j]
                per_param[j] = {
                    key: torch.stack(
                        [
                            layout.pad(
                                name, c["optimizer_states"][k]["state"][j][key], shapes[name]
                            )
                            for c, layout in zip(saved, model.layouts)
                        ]
                    )
                    if torch.is_tensor(value)
                    and tuple(value.shape) == model.layouts[0].shapes[name]
                    else value
                    for key, value in values.items()
                }
            optimizers.append({"state": per_param, "param_groups": group_state["param_groups"]})
        fused["optimizer_states"] = optimizers
        # Where a standalone run keeps its noise stream: also a checkpoint from a basic sweep.
        on_cuda = self.device.type == "cuda"
        generators = []
        for c in saved:
            randomness = c.get("callbacks", {}).get(SeedEachEpoch(0).state_key, {})
            cuda = randomness.get("cuda") or []
            index = self.device.index or 0
            if on_cuda:
                generators.append(cuda[index] if index < len(cuda) else None)
            else:
                generators.append(randomness.get("torch") if self.device.type == "cpu" else None)
        fused[FUSED_KEY] = {
            "generators": generators if all(g is not None for g in generators) else [],
            "epoch_sums": [c.get("genlab_epoch_sums", {"sums": {}, "count": 0}) for c in saved],
        }
        for member, c in zip(self.members, saved):
            state = c.get("callbacks", {}).get(member.ranking.state_key) if member.ranking else None
            if state:
                member.ranking.load_state_dict(state)
            member.checkpoint = None  # read once; the group holds it now
        return fused

    # -- the training loop's hooks ------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._restart_pending:  # a resumed group: the jobs' logs forget the lost steps
            self._restart_pending = False
            step = private_api.logged_step(trainer)
            mark_restart([m.logger for m in self.members if m.logger], step)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        model = self.model
        self._record_divergences(trainer)
        if model.step_logged is not None:
            step = model.step_logged
            for index in self.training():
                values = dict(zip(model.member_metric_names(index), model.last_values[index]))
                self._log(index, {f"train/{n}_step": v for n, v in values.items()}, step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model, epoch = self.model, trainer.current_epoch
        model._read()  # the epoch's last look at the flags (pictures and checkpoints follow)
        self._record_divergences(trainer)
        # Under the step of the epoch's last batch, as Lightning logs epoch metrics (its
        # counter has already moved on to the next batch's).
        step = private_api.logged_step(trainer) - 1
        shown, ranked = [], []
        all_sums = model.epoch_sums()
        for index in self.training():
            sums = all_sums[index]
            train = (
                {f"train/{n}": v / sums.count for n, v in sums.sums.items()} if sums.count else {}
            )
            validated = model.validated_epoch == epoch  # trainer.check_val_every_n_epoch
            val = {f"val/{n}": v for n, v in model.val_means[index].items()} if validated else {}
            self._log(index, {**train, **val}, step)
            member = self.members[index]
            shown.append((member.job, val.get("val/loss", train.get("train/loss", math.nan))))
            if member.ranking is not None:  # ranks when its monitored metric is there
                ranked.append((index, {**train, **val}))
        last = trainer.max_epochs
        of = f" ({epoch + 1} of {last})" if last is not None and last >= 0 else ""
        which = "val/loss" if model.validated_epoch == epoch else "train/loss"
        numbers = ", ".join(f"{job}: {value:.4g}" for job, value in shown)
        log.info("Epoch %d%s, %s by job: %s", epoch, of, which, numbers)
        self._save_best(trainer, ranked)
        for index in self.training():
            member = self.members[index]
            if member.images is not None:
                member.images.epoch_end(
                    self.datamodule,
                    model.materialise(index),
                    member.writers,
                    epoch,
                    trainer.global_step,
                )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_divergences(trainer)
        for index in self.training():
            member = self.members[index]
            if member.images is not None:
                member.images.fit_end(
                    self.datamodule,
                    self.model.materialise(index),
                    member.writers,
                    trainer.global_step,
                )

    def _save_best(self, trainer: pl.Trainer, ranked: list[tuple[int, dict[str, float]]]) -> None:
        """Each member's top-k checkpoints by its monitored metric, as ModelCheckpoint keeps
        them (the same file names, and that callback's state in the checkpoints)."""
        chosen = []
        for index, metrics in ranked:
            callback = self.members[index].ranking
            path = _rank(callback, metrics, trainer.current_epoch, trainer.global_step)
            if path is not None:
                chosen.append((index, path))
        if not chosen:
            return
        fused = private_api.dump_checkpoint(trainer)
        io = trainer.strategy.checkpoint_io
        for index, (path, dropped) in chosen:
            io.write(self.member_checkpoint(fused, index), path)
            if dropped:
                Path(dropped).unlink(missing_ok=True)

    def _log(self, index: int, metrics: dict[str, float], step: int) -> None:
        logger = self.members[index].logger
        if logger and metrics:
            logger.log_metrics(metrics, step)

    def _record_divergences(self, trainer: pl.Trainer) -> None:
        """metrics.json of each member found diverged since the last call."""
        for index, reason in self.model.diverged.items():
            if index not in self._recorded:
                self._recorded.add(index)
                self._diverged(trainer, index, reason)

    def _diverged(self, trainer: pl.Trainer, index: int, reason: str) -> None:
        member = self.members[index]
        member.metrics = record_diverged(
            trainer, member.cfg, f"Job {member.job}: {reason}", self.start
        )
        if member.logger:
            member.logger.finalize("failed")


def _rank(
    callback: ModelCheckpoint, metrics: dict[str, float], epoch: int, step: int
) -> tuple[str, str | None] | None:
    """Offer a checkpoint scoring ``metrics`` to ``callback``'s top k, updating its state as
    it would: the file to write and the file it drops, or None when it does not rank."""
    score = metrics.get(callback.monitor)
    k = callback.save_top_k
    if score is None or k == 0 or not math.isfinite(score):
        return None
    better = (lambda a, b: a < b) if callback.mode == "min" else (lambda a, b: a > b)
    kept = callback.best_k_models
    if k != -1 and len(kept) >= k and not better(score, float(callback.kth_value)):
        return None
    path = callback.format_checkpoint_name({"epoch": epoch, "step": step, **metrics})
    current = torch.tensor(score)
    callback.current_score = current
    kept[path] = current
    dropped = None
    if k != -1 and len(kept) > k:
        dropped = callback.kth_best_model_path
        del kept[dropped]
    by_score = sorted(kept, key=lambda p: float(kept[p]), reverse=callback.mode == "max")
    callback.best_model_path, callback.best_model_score = by_score[0], kept[by_score[0]]
    callback.kth_best_model_path = by_score[-1]
    callback.kth_value = kept[by_score[-1]]
    return path, dropped


def build_member(member: Member) -> None:
    """Build ``member``'s model as its standalone run would (seeded, then instantiated),
    and read its last.ckpt when it resumes; a `GenlabError` says why it cannot train."""
    cfg = member.cfg
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = instantiate(cfg.model)
    model.run_config = member.run_config
    check_training_setup(member.run_config, model)
    if member.resume:
        path, member.checkpoint = resume_checkpoint(
            "last", member.checkpoint_dir, member.run_config, member.output_dir
        )
        check_resumable(member.checkpoint, model, path)
    member.model = model
    member.logger = instantiate(cfg.logger) if cfg.get("logger") else None
    callbacks = cfg.get("callbacks") or {}
    member.images = instantiate(callbacks["images"]) if callbacks.get("images") else None
    checkpoints = callbacks.get("model_checkpoint")
    member.ranking = instantiate(checkpoints) if checkpoints else None


def train_group(members: list[Member], group_dir: Path) -> None:
    """Train the built ``members`` (`build_member`) as one `FusedModel`, in this process;
    each member's ``metrics`` ends as what its metrics.json says."""
    start = time.perf_counter()
    _quiet_third_party_noise()
    first = members[0].cfg
    stopper = StopSignals(group_dir / GROUP_CHECKPOINTS)
    runs = FusedRuns(members, group_dir, start)
    with stopper.installed():
        datamodule = instantiate(first.data)
        datamodule.prepare_data()
        callbacks: list[pl.Callback] = [runs, stopper]
        last = (first.get("callbacks") or {}).get("last_checkpoint")
        if last:
            every = last.get("every_n_train_steps")
            callbacks.append(LastCheckpoint(group_dir / GROUP_CHECKPOINTS, every))
        bar = (first.get("callbacks") or {}).get("progress_bar")
        if bar and first.trainer.get("enable_progress_bar", True):
            callbacks.append(instantiate(bar))
        trainer = _build_trainer(
            first,
            logger=False,
            callbacks=callbacks,
            plugins=[MemberCheckpointIO(runs)],
            enable_model_summary=False,
            enable_checkpointing=bool(last),
            default_root_dir=str(group_dir / GROUP_CHECKPOINTS),
        )
        runtime.cache_cuda_check(trainer)
        stopper.trainer, runs.device = trainer, trainer.strategy.root_device
        datamodule.trainer = trainer  # its splits go to the training device
        datamodule.setup("fit")
        datamodule.setup("test")
        seeds = [int(m.cfg.data.seed) for m in members]
        orders = list(dict.fromkeys(seeds))
        loaders = []
        for seed in orders:  # the same tensors, shuffled by each seed
            ordered = copy.copy(datamodule)
            ordered.seed = seed
            loaders.append(ordered.train_dataloader())
        model = FusedModel(
            [m.model for m in members],
            [int(m.cfg.seed) for m in members],
            [orders.index(s) for s in seeds],
        )
        runs.model, runs.datamodule = model, datamodule

        stopper.phase = "training"
        for member in members:
            record_run(member.output_dir, member.composed, member.hydra_cfg)
            if member.resume:
                (member.output_dir / METRICS_FILE).unlink(missing_ok=True)
            if member.logger:
                member.logger.log_hyperparams(member.run_config)
        jobs = ", ".join(m.job for m in members)
        log.info(
            "Fused: %s %s as one model in this process (%d parameters, latent "
            "codes padded to %d). Run directories: %s/{%s}.",
            "jobs" if len(members) > 1 else "job",
            f"{jobs} train" if len(members) > 1 else f"{jobs} trains",
            sum(p.numel() for p in model.parameters()),
            model.padded_dim,
            members[0].output_dir.parent.resolve(),
            jobs,
        )
        resume = any(m.resume for m in members)
        try:
            trainer.fit(
                model,
                train_dataloaders=FusedLoader(loaders),
                val_dataloaders=datamodule.val_dataloader(),
                ckpt_path=str(group_dir / GROUP_CHECKPOINTS / LAST_CHECKPOINT) if resume else None,
                weights_only=True,
            )
            stopper.phase = "test"
            if stopper.signum is not None:  # after the loop's last look; last.ckpt saved
                raise SIGTERMException
            _test(trainer, runs, datamodule, stopper)
        except (Interrupted, SIGTERMException) as stop:
            at_once = isinstance(stop, Interrupted)
            stopped_in, stopper.phase = stopper.stopped_in or stopper.phase, "stopping"
            for index in runs.training():
                member = members[index]
                if member.metrics is None or member.metrics.get("status") == "completed":
                    member.metrics = record_interrupted(
                        trainer, member.cfg, stopper, stopped_in, start, at_once=at_once
                    )
        finally:
            for index in runs.training():  # the diverged ones' were closed when they stopped
                if members[index].logger:
                    members[index].logger.finalize("success")


def _test(trainer: pl.Trainer, runs: FusedRuns, datamodule: Any, stopper: StopSignals) -> None:
    """Each training member's test metrics, on its best checkpoint (else its final
    weights), all in one pass; then its evaluation and metrics.json."""
    model, members = runs.model, runs.members
    training = runs.training()
    if not training:  # every member diverged: each has said so
        return
    tested: dict[int, str | None] = {}
    for index in training:
        ranking = members[index].ranking
        path = ranking.best_model_path if ranking is not None and ranking.best_model_path else None
        if path:
            checkpoint = read_checkpoint(path, "the best checkpoint")
            load_weights(copy.deepcopy(members[index].model), checkpoint, path)
            model.set_member_weights(index, checkpoint["state_dict"])
        tested[index] = path
    model.eval()
    loader = datamodule.test_dataloader()
    results = model.evaluate(
        loader, _limit(members[0].cfg.trainer.get("limit_test_batches"), len(loader))
    )
    step = private_api.logged_step(trainer)
    stopper.phase = "evaluation"
    for index in training:
        member = members[index]
        path = tested[index]
        if path:
            val = {member.ranking.monitor: float(member.ranking.best_model_score)}
        else:
            val = {f"val/{n}": v for n, v in model.val_means[index].items()}
        test = {f"test/{n}": v for n, v in results[index].items()}
        metrics: dict[str, Any] = {
            "status": "completed",
            **val,
            **test,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "tested_checkpoint": os.path.relpath(path, member.output_dir)
            if path
            else "final weights",
        }
        if member.logger:
            member.logger.log_metrics(test, step)
            if (member.cfg.get("callbacks") or {}).get("hparams"):
                write_hparams(member.writers, member.run_config, test, step)
        options = instantiate(member.cfg.eval)
        if options.after_fit:
            metrics.update(
                evaluate_model(
                    model.materialise(index), member.cfg.data, options, member.cfg.paths.cache_dir
                )
            )
        member.metrics = metrics
    stopper.phase = "writing results"
    wall = round(time.perf_counter() - runs.start, 2)
    for index in training:
        member = members[index]
        member.metrics["wall_time_s"] = wall  # the group's: its jobs trained together
        write_metrics(member.output_dir / METRICS_FILE, member.metrics)
    stopper.phase = "done"
    for index in training:
        member = members[index]
        numbers = ", ".join(
            f"{k} {v:.4g}"
            for k, v in member.metrics.items()
            if k.startswith("test/") and isinstance(v, int | float)
        )
        log.info(
            "Job %s completed: %s. Results: %s",
            member.job,
            numbers,
            (member.output_dir / METRICS_FILE).resolve(),
        )


def _limit(limit: float | None, total: int) -> int:
    """How many of ``total`` batches Lightning's ``limit_*_batches`` lets a loop run: a
    count (int), or a fraction (float)."""
    if limit is None:
        return total
    if isinstance(limit, float):
        return int(total * limit)
    return min(int(limit), total)
