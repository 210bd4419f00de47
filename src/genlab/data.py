"""MNIST and Fashion-MNIST as in-memory tensors, served in batches by index.

torchvision's dataset classes find (or download) and decode the IDX files,
once genlab has checked each file's header against its size (a truncated or
corrupt file is named, not decoded into garbage) and, with ``verify=True``,
its SHA-256 against the official release. Each split is then held as one
float tensor of shape (N, 1, 28, 28) in [0, 1] (on the GPU when training
there) and batches are cut from a seeded permutation. This avoids the
per-sample PIL decode + ToTensor + collate of a Dataset/DataLoader pipeline,
which dominates an epoch at this model size.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchvision import datasets

from genlab.errors import GenlabError, check_choice

log = logging.getLogger(__name__)

DATASETS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}
# Names of the ten classes, by label, as plots show them.
CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion_mnist": list(datasets.FashionMNIST.classes),
}
BINARIZE = ("none", "dynamic", "static")
# Fixed seed of the one Bernoulli sample used for static binarisation and for
# evaluating dynamically binarised runs, so every run sees the same binary data.
_BINARIZE_SEED = 20140101

# SHA-256 of the official IDX files after gunzip, for data.verify=true. The
# releases publish checksums of their .gz archives only; these digests of the
# unpacked files are the ones independent public projects pin. Keyed by
# torchvision's folder name, then file name.
OFFICIAL_SHA256 = {
    "MNIST": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
IMAGE_SIZE = (28, 28)
NUM_CLASSES = 10


def _mix(seed: int, epoch: int) -> int:
    # Distinct (seed, epoch) pairs get distinct streams: seed 1 at epoch 0 must not replay seed 0 at epoch 1.
    return (seed * 1_000_003 + epoch) % (2**63)


def _to_float(images: Tensor) -> Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return images.unsqueeze(1).float().div_(255.0)


def check_idx(path: Path, ndim: int, item_shape: tuple[int, ...]) -> int:
    """Check an IDX file of unsigned bytes against its own header; return its item count.

    The header is a magic number (0x0000 08 <ndim>) and ``ndim`` big-endian
    sizes; the file must hold exactly the bytes those sizes announce.
    """
    magic = 0x0800 + ndim
    size = path.stat().st_size
    header_size = 4 + 4 * ndim
    with path.open("rb") as f:
        header = f.read(header_size)
    if len(header) < header_size:
        problem = f"it has {size} bytes, fewer than an IDX header needs"
    elif struct.unpack(">I", header[:4])[0] != magic:
        problem = (
            f"its magic number is 0x{header[:4].hex()}, not 0x{magic:08x} "
            f"(unsigned bytes in {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    else:
        count, *shape = struct.unpack(f">{ndim}I", header[4:])
        expected = header_size + count * math.prod(shape)
        if tuple(shape) != item_shape:
            problem = f"its items have shape {tuple(shape)}, not {item_shape}"
        elif size != expected:
            problem = (
                f"its header announces {count} items ({expected} bytes) but the file has "
                f"{size} bytes, so it is truncated or corrupt"
            )
        else:
            return count
    raise GenlabError(
        f"{str(path)!r} is not a valid IDX file: {problem}. Replace it with an intact copy "
        f"(or delete it and run with data.download=true to fetch it again)."
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def binarize_sample(images: Tensor, seed: int) -> Tensor:
    """One stochastic binarisation: each pixel is 1 with probability equal to its grey level."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    return torch.bernoulli(images, generator=generator)


class EpochOrder:
    """The order in which one epoch visits the examples: a permutation drawn from (seed, epoch).

    Lightning calls ``loader.sampler.set_epoch(epoch)`` before every epoch, as
    it does for a DataLoader's sampler, so a resumed run sees the same order as
    an uninterrupted one.
    """

    def __init__(self, size: int, shuffle: bool, seed: int):
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self, device: torch.device) -> torch.Generator:
        """The epoch's random stream: it draws the order, then any per-batch noise."""
        return torch.Generator(device=device).manual_seed(_mix(self.seed, self.epoch))

    def indices(self, generator: torch.Generator) -> Tensor | None:
        """A permutation of range(size), or None to keep the stored order."""
        if not self.shuffle:
            return None
        return torch.randperm(self.size, generator=generator, device=generator.device)


class BatchLoader:
    """Yields ``(images, labels)`` batches from in-memory tensors, like a DataLoader.

    ``binarize_dynamic`` draws a fresh binary sample of every batch each time
    it is served (seeded by the epoch), as in dynamically binarised MNIST.

    With several processes (DDP), every process draws the same epoch order and
    takes every ``world_size``-th batch of it, starting at its ``rank``: the
    shares are disjoint and together make the whole epoch. ``even_shards`` (for
    training) tops the shorter shares up with the epoch's first batches, so that
    every process takes the same number of optimiser steps, as DDP requires.

    The loader is resumable: Lightning saves ``state_dict()`` (the epoch and
    how many of its batches were served) in every checkpoint, and a run
    resumed mid-epoch serves the rest of that epoch exactly as an
    uninterrupted run would have.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        binarize_dynamic: bool = False,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool = False,
    ):
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.binarize_dynamic = binarize_dynamic
        self.rank = rank
        self.world_size = world_size
        self.even_shards = even_shards
        # The two attributes Lightning inspects on a DataLoader: it calls
        # sampler.set_epoch() each epoch; no batch_sampler means batches are ours.
        self.sampler = EpochOrder(len(images), shuffle, seed)
        self.batch_sampler = None
        self._served = 0  # batches of the current pass handed out so far
        self._resume_at: dict[str, int] | None = None

    def batch_starts(self) -> list[int]:
        """Where this process's batches begin in the epoch's order."""
        starts = list(range(0, len(self.images), self.batch_size))
        mine = starts[self.rank :: self.world_size]
        if self.even_shards:
            mine += starts[: math.ceil(len(starts) / self.world_size) - len(mine)]
        return mine

    def __len__(self) -> int:
        return len(self.batch_starts())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_at = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # The body runs at the first next(), after Lightning's set_epoch().
        generator = self.sampler.generator(self.images.device)
        order = self.sampler.indices(generator)
        skip, self._resume_at = self._resume_at, None
        first = skip["batches"] if skip and skip["epoch"] == self.sampler.epoch else 0
        self._served = 0
        for start in self.batch_starts():
            if order is None:  # slicing is a view: no copy
                images = self.images[start : start + self.batch_size]
                labels = self.labels[start : start + self.batch_size]
            else:
                idx = order[start : start + self.batch_size]
                # index_select gathers rows about twice as fast as images[idx].
                images, labels = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            if self.binarize_dynamic:
                # Drawn for skipped batches too, so the stream stays where it would be.
                images = torch.bernoulli(images, generator=generator)
            self._served += 1
            if self._served > first:
                yield images, labels


class ImageDataModule(pl.LightningDataModule):
    """MNIST or Fashion-MNIST: train minus a seeded validation split, and the official test set.

    Args:
        dataset: ``mnist`` or ``fashion_mnist``.
        data_dir: folder holding torchvision's layout (``<data_dir>/MNIST/raw/...``).
        batch_size: training batch size.
        eval_batch_size: batch size for validation and test (no gradients, so larger is faster).
        val_size: examples carved out of the training set for validation (0: no validation).
        binarize: ``none`` (grey levels in [0, 1]), ``static`` (one fixed Bernoulli sample of
            every split) or ``dynamic`` (training batches resampled every epoch; validation and
            test use the fixed sample so their numbers are comparable across epochs and runs).
        download: fetch the files with torchvision when they are missing.
        verify: check every file's SHA-256 against the official release (`OFFICIAL_SHA256`).
        seed: seeds the shuffle of each epoch (with the epoch number).
        split_seed: seeds the train/validation split; fixed by default so that runs with
            different seeds are validated on the same examples.
    """

    def __init__(
        self,
        dataset: str = "mnist",
        data_dir: str | os.PathLike = "./data",
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        binarize: str = "none",
        download: bool = True,
        seed: int = 42,
        split_seed: int = 0,
        verify: bool = False,
    ):
        super().__init__()
        check_choice("data.dataset", dataset, DATASETS)
        check_choice("data.binarize", binarize, BINARIZE)
        self.dataset = dataset
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.binarize = binarize
        self.download = download
        self.seed = seed
        self.split_seed = split_seed
        self.verify = verify
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        # This process's share of every epoch when training on several (see BatchLoader).
        self._shard = {"rank": 0, "world_size": 1}
        self._decoded: dict[bool, tuple[Tensor, Tensor]] = {}

    @property
    def class_names(self) -> list[str]:
        """The name of each label, e.g. ``"Trouser"`` for Fashion-MNIST's label 1."""
        return CLASS_NAMES[self.dataset]

    # -- finding and decoding the files -------------------------------------------------------

    def _missing_message(self, reason: str) -> str:
        folder = DATASETS[self.dataset].__name__
        env = os.environ.get("GENLAB_DATA_DIR")
        env_text = f"GENLAB_DATA_DIR={env!r}" if env else "GENLAB_DATA_DIR is not set"
        return (
            f"The {folder} data set was not found in {str(self.data_dir.resolve())!r} "
            f"(expected torchvision's layout, e.g. {folder}/raw/train-images-idx3-ubyte), and "
            f"{reason}. genlab reads data from data.data_dir, which defaults to the "
            f"GENLAB_DATA_DIR environment variable and then ./data ({env_text}). Point "
            f"data.data_dir=<folder> or GENLAB_DATA_DIR at a folder that holds the files, or "
            f"run with data.download=true on a machine with internet access."
        )

    def _decode(self, train: bool) -> tuple[Tensor, Tensor]:
        """Images as uint8 (N, 28, 28) and labels as int64, read once per split."""
        if train not in self._decoded:
            split = self._open(train)
            labels = split.targets.long()
            if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < NUM_CLASSES:
                raise GenlabError(
                    f"{str(self._files(train)[1])!r} holds labels outside 0..{NUM_CLASSES - 1}, "
                    f"so it is corrupt or not a {self.dataset} label file. Replace it with an "
                    f"intact copy."
                )
            self._decoded[train] = (split.data, labels)
        return self._decoded[train]

    def _take_decoded(self, train: bool) -> tuple[Tensor, Tensor]:
        """The decoded split, released from the cache once setup() has built its tensors."""
        decoded = self._decode(train)
        del self._decoded[train]
        return decoded

    def _files(self, train: bool) -> tuple[Path, Path]:
        """The split's image and label files, where torchvision keeps them."""
        raw = self.data_dir / DATASETS[self.dataset].__name__ / "raw"
        prefix = "train" if train else "t10k"
        return raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"

    def _open(self, train: bool) -> datasets.VisionDataset:
        cls = DATASETS[self.dataset]
        # torchvision wants all four files of a data set before it reads any.
        if not all(path.is_file() for split in (True, False) for path in self._files(split)):
            self._download()
        images, labels = self._files(train)
        count = check_idx(images, 3, IMAGE_SIZE)
        if check_idx(labels, 1, ()) != count:
            raise GenlabError(
                f"{str(images)!r} holds {count} images but {str(labels)!r} holds "
                f"{check_idx(labels, 1, ())} labels: the two files do not belong together. "
                f"Replace them with an intact pair."
            )
        if self.verify:
            self._verify(images, labels)
        return cls(self.data_dir, train=train, download=False)

    def _download(self) -> None:
        if not self.download:
            raise GenlabError(self._missing_message("data.download is false"))
        if not self.data_dir.exists() and not self.data_dir.parent.exists():
            raise GenlabError(
                self._missing_message(
                    "neither that folder nor its parent exists (a typo?), so no download was tried"
                )
            )
        try:
            DATASETS[self.dataset](self.data_dir, train=True, download=True)
        except Exception as err:  # no network, a read-only folder, a failing mirror
            # torchvision lists every mirror it tried; the last line holds the final cause.
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise GenlabError(self._missing_message(f"downloading it failed ({reason})")) from err

    def _verify(self, *paths: Path) -> None:
        official = OFFICIAL_SHA256[DATASETS[self.dataset].__name__]
        for path in paths:
            digest = sha256(path)
            if digest != official[path.name]:
                raise GenlabError(
                    f"{str(path)!r} is not the official {self.dataset} file: its SHA-256 is "
                    f"{digest}, the official one is {official[path.name]} (data.verify=true). "
                    f"It may be corrupt or a rebuilt copy; replace it with the official file, or "
                    f"set data.verify=false to train on it as it is."
                )

    # -- Lightning hooks ----------------------------------------------------------------------

    def prepare_data(self) -> None:
        # Lightning calls this once per node before setup(): the place to download.
        self._decode(train=True)
        self._decode(train=False)

    def setup(self, stage: str | None = None) -> None:
        device = torch.device("cpu")
        if self.trainer is not None:
            device = self.trainer.strategy.root_device
            self._shard = {"rank": self.trainer.global_rank, "world_size": self.trainer.world_size}
        if stage in (None, "fit", "validate") and "train" not in self.splits:
            images, labels = self._take_decoded(train=True)
            if not 0 <= self.val_size < len(images):
                raise GenlabError(
                    f"data.val_size={self.val_size} must be between 0 and {len(images) - 1} "
                    f"(the {self.dataset} training set has {len(images)} images)."
                )
            order = torch.randperm(
                len(images), generator=torch.Generator().manual_seed(self.split_seed)
            )
            val_idx, train_idx = order[: self.val_size], order[self.val_size :]
            train_images = _to_float(images[train_idx])
            if self.binarize == "static":
                train_images = binarize_sample(train_images, _BINARIZE_SEED)
            self.splits["train"] = (train_images.to(device), labels[train_idx].to(device))
            self.splits["val"] = self._eval_split(images[val_idx], labels[val_idx], device)
        if stage in (None, "test", "predict") and "test" not in self.splits:
            self.splits["test"] = self._eval_split(*self._take_decoded(train=False), device)

    def _eval_split(
        self, images: Tensor, labels: Tensor, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        images = _to_float(images)
        if self.binarize != "none":
            images = binarize_sample(images, _BINARIZE_SEED + 1)
        return images.to(device), labels.to(device)

    def train_dataloader(self) -> BatchLoader:
        images, labels = self.splits["train"]
        loader = BatchLoader(
            images,
            labels,
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            binarize_dynamic=self.binarize == "dynamic",
            even_shards=True,
            **self._shard,
        )
        if loader.world_size > 1:
            log.info(
                "Process %d of %d trains on %d of the %d batches of each epoch.",
                loader.rank,
                loader.world_size,
                len(loader),
                math.ceil(len(images) / self.batch_size),
            )
        return loader

    def val_dataloader(self) -> BatchLoader | list:
        if self.val_size == 0:
            return []  # Lightning skips validation when there is no loader
        return BatchLoader(*self.splits["val"], self.eval_batch_size, **self._shard)

    def test_dataloader(self) -> BatchLoader:
        return BatchLoader(*self.splits["test"], self.eval_batch_size, **self._shard)
