"""Checkpoints: written whole or not at all, ``last.ckpt`` kept up to date, and read
back as data (tensors and plain values, never code) to rebuild a trained model."""

from __future__ import annotations

import copy
import hashlib
import importlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Checkpoint

from genlab.atomic import write_atomically
from genlab.errors import GenlabError
from genlab.models.base import CONFIG_KEY, GenerativeModel
from genlab.options import Range, checked
from genlab.rundir import LAST_CHECKPOINT

# Checkpoint entry holding a hash of the weights, checked when they are loaded: a file
# changed on disk (a flipped bit) is not silently trained on or evaluated.
WEIGHTS_HASH_KEY = "genlab_weights_sha256"


def weights_hash(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through `write_atomically`: a crash or ``kill -9``
    during a save leaves the previous checkpoint whole. (Lightning's own stages the file in
    the system's temp folder, and a move from another file system is a copy.) It stores
    the weights' hash (`WEIGHTS_HASH_KEY`) beside them."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint = {**checkpoint, WEIGHTS_HASH_KEY: weights_hash(checkpoint["state_dict"])}
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's way
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomically(path, lambda f: torch.save(checkpoint, f))


class LastCheckpoint(Checkpoint):
    """Keeps ``<dirpath>/last.ckpt``, what ``resume=last`` continues from, up to date.

    It is written at the end of every training epoch, every
    ``every_n_train_steps`` optimizer steps when set (mid-epoch checkpoints for
    long epochs; a GAN takes two steps per batch), and when training ends.

    Lightning's ``ModelCheckpoint(save_last=True)`` only writes ``last.ckpt``
    beside a top-k save: with a monitored metric it postpones step saves until
    the first validation, and with ``save_top_k=0`` (the GAN) it writes it only
    when training ends. As a `Checkpoint`, this runs after every
    ``ModelCheckpoint``, so the file records their latest best checkpoint.
    """

    @checked("callbacks.last_checkpoint")
    def __init__(
        self,
        dirpath: str | os.PathLike,
        every_n_train_steps: Annotated[int, Range(1)] | None = None,
    ):
        self.path = Path(dirpath) / LAST_CHECKPOINT
        self.every_n_train_steps = every_n_train_steps
        self._saved_at: int | None = None

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking or self._saved_at == trainer.global_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)


def read_checkpoint(
    path: str | os.PathLike, option: str, map_location: str = "cpu"
) -> dict[str, Any]:
    """The contents of a checkpoint file, loaded as data only (``weights_only``); anything
    else is a `GenlabError` naming ``option``, the setting that pointed at it."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holding arbitrary objects
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in reason:  # torch's advice to unpickle arbitrary code: never needed here
            reason = f"{type(err).__name__}: not a file of tensors and plain data"
        raise GenlabError(
            f"{option}: {str(path)!r} is not a readable checkpoint ({reason}). Point it at a .ckpt "
            f"file that genlab-train wrote."
        ) from err
    if not isinstance(checkpoint, dict):
        raise GenlabError(f"{option}: {str(path)!r} is not a checkpoint that genlab-train wrote.")
    return checkpoint


# What a checkpoint's config may name to be rebuilt: a class defined in one of these
# modules, named directly in it (``genlab.models.VAE``, ``torch.optim.Adam``), of the
# kind given. A checkpoint is data: anything else it names is refused before it is
# built, so a crafted file cannot make genlab call code (``genlab.models.base.os.system``
# reaches a function through an import, and is refused).
TRUSTED_CLASSES = {
    "genlab.models": None,  # None: any class genlab defines (a model, a net spec)
    "genlab.models.nets": None,
    "genlab.data": None,
    "torch.optim": "torch.optim.Optimizer",
    "torch.optim.lr_scheduler": "torch.optim.lr_scheduler.LRScheduler",
}
# The parts of the run config that rebuilding a model and its data instantiates.
_REBUILT = ("model", "data")


def _targets(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(config key, value) of every ``_target_`` under ``node``, lists included."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield where, value
            else:
                yield from _targets(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{path}[{i}]")


def trusted_run_config(saved: Any, source: str, trusted: Sequence[str] = ()) -> dict[str, Any]:
    """A checkpoint's run config, resolved, once every class it would have rebuilt is on
    the allow-list (`TRUSTED_CLASSES`, plus ``trusted`` prefixes the user names)."""
    not_genlab = f"{source!r} is not a checkpoint genlab-train wrote"
    if not isinstance(saved, dict):
        raise GenlabError(
            f"{not_genlab}: its run config is a {type(saved).__name__}, not a mapping."
        )
    try:
        config = OmegaConf.to_container(OmegaConf.create(saved), resolve=True)
    except Exception as err:  # OmegaConf's errors for keys or interpolations it cannot read
        raise GenlabError(f"{not_genlab}: its run config cannot be read ({err}).") from err
    missing = [part for part in _REBUILT if not isinstance(config.get(part), dict)]
    if missing:
        raise GenlabError(f"{not_genlab}: its run config has no {' or '.join(missing)} section.")
    refused = [
        f"{key}={value!r}"
        for part in _REBUILT
        for key, value in _targets(config[part], part)
        if not _trusted(value, trusted)
    ]
    if refused:
        raise GenlabError(
            f"{source!r} asks to build {', '.join(refused)}, which is not a genlab model or data "
            f"set or a torch optimiser or schedule; genlab rebuilds only those from a checkpoint "
            f"(a checkpoint is data, never code). If you trust the file and wrote that class "
            f"yourself, allow its module with trusted_targets=[<module prefix>.]."
        )
    return config


def _trusted(target: Any, trusted: Sequence[str]) -> bool:
    """Whether ``target`` names a class genlab may build from a checkpoint (see
    `TRUSTED_CLASSES`), or lies under a prefix the user trusts."""
    if not isinstance(target, str):
        return False
    if any(target.startswith(prefix) for prefix in trusted):
        return True
    module_name, _, name = target.rpartition(".")
    if module_name not in TRUSTED_CLASSES or not name.isidentifier():
        return False
    # Only modules genlab itself imports: importing them runs no code from the checkpoint.
    found = getattr(importlib.import_module(module_name), name, None)
    if not isinstance(found, type):
        return False
    kind = TRUSTED_CLASSES[module_name]
    if kind is None:
        return found.__module__.startswith("genlab.")
    kind_module, _, kind_name = kind.rpartition(".")
    return issubclass(found, getattr(importlib.import_module(kind_module), kind_name))


def trusted_prefixes(value: Any) -> list[str]:
    """``trusted_targets`` as a list of module prefixes, each ending with a dot; one
    string is one prefix. Anything else is a `GenlabError`."""
    prefixes = [value] if isinstance(value, str) else list(value or [])
    bad = [p for p in prefixes if not isinstance(p, str) or not p.endswith(".") or p == "."]
    if bad:
        raise GenlabError(
            f"trusted_targets={value!r}: each entry must be a module prefix ending with a "
            f"dot, e.g. trusted_targets=[mylab.models.]; {bad[0]!r} is not one."
        )
    return prefixes


def load_model(
    ckpt_path: str | os.PathLike, map_location: str = "cpu", trusted: Sequence[str] = ()
) -> GenerativeModel:
    """Rebuild a trained model from a genlab checkpoint (its run config travels inside it;
    only classes of `TRUSTED_CLASSES` and under ``trusted`` prefixes are built from it)."""
    checkpoint = read_checkpoint(ckpt_path, "ckpt_path", map_location)
    if CONFIG_KEY not in checkpoint:
        raise GenlabError(
            f"{str(ckpt_path)!r} is not a genlab checkpoint (it holds no run config). Pass a "
            f".ckpt file written by genlab-train, e.g. <run dir>/checkpoints/last.ckpt."
        )
    config = trusted_run_config(checkpoint[CONFIG_KEY], str(ckpt_path), trusted)
    model = instantiate(OmegaConf.create(config).model)
    load_weights(model, checkpoint, str(ckpt_path))
    model.run_config = config
    return model.eval()


def load_weights(model: torch.nn.Module, checkpoint: dict[str, Any], source: str) -> None:
    """The checkpoint's weights into ``model``, or a `GenlabError` saying why they do not fit
    (none, the wrong names or shapes, a hash that does not match, NaN)."""
    weights = checkpoint.get("state_dict")
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise GenlabError(f"{source!r} holds no model weights (no state_dict of tensors).")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # missing, unexpected or misshapen tensors
        first = " ".join(str(err).split())[:400]
        raise GenlabError(
            f"{source!r}: its weights do not fit the model its own config describes ({first}). "
            f"The file was changed after genlab-train wrote it, or comes from elsewhere."
        ) from err
    saved_hash = checkpoint.get(WEIGHTS_HASH_KEY)
    if saved_hash is not None and saved_hash != weights_hash(weights):
        raise GenlabError(
            f"{source!r} is damaged: its weights no longer match the hash saved with them (the "
            f"file changed on disk after it was written). Use another checkpoint of the run, "
            f"e.g. its best-epoch*.ckpt, or train again."
        )
    broken = [
        name for name, w in weights.items() if w.is_floating_point() and not w.isfinite().all()
    ]
    if broken:
        raise GenlabError(
            f"{source!r} holds NaN or infinite weights ({', '.join(broken[:3])}); genlab never "
            f"saves those, so the file was changed after genlab-train wrote it."
        )


# What Lightning needs in a checkpoint to continue training from it.
_TRAINING_STATE = ("epoch", "global_step", "loops", "optimizer_states")


def check_resumable(checkpoint: dict[str, Any], model: torch.nn.Module, source: str) -> None:
    """Refuse a checkpoint that ``model``'s training cannot continue from, before the run
    is accepted (Lightning would fail only once it has started)."""
    missing = [key for key in _TRAINING_STATE if key not in checkpoint]
    if missing:
        raise GenlabError(
            f"{source!r} holds no training state to continue ({', '.join(missing)} missing): it "
            f"was not written by genlab-train. Resume from a run's checkpoints/last.ckpt."
        )
    probe = copy.deepcopy(model)  # the run's own model is loaded by Lightning, at its start
    load_weights(probe, checkpoint, source)
