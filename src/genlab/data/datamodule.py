"""MNIST and Fashion-MNIST as a Lightning DataModule of in-memory tensors.

torchvision's dataset classes find (or download) and decode the IDX files, once
`genlab.data.files` has checked them. Each split is then held as one float tensor of
shape (N, 1, 28, 28) in [0, 1] (on the GPU when training there) and served by a
`BatchLoader`: no per-sample PIL decode + ToTensor + collate, which would dominate an
epoch at this model size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Annotated, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchvision import datasets

from genlab.data.files import check_pair, verify_official
from genlab.data.loader import BatchLoader
from genlab.errors import GenlabError
from genlab.options import Range, checked

log = logging.getLogger(__name__)

DATASETS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}
Dataset = Literal[tuple(DATASETS)]
# Names of the ten classes, by label, as plots show them.
CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion_mnist": list(datasets.FashionMNIST.classes),
}
Binarize = Literal["none", "dynamic", "static"]
# The one Bernoulli sample of the training split (binarize=static), and of the validation
# and test splits (static and dynamic): every run and every evaluation sees the same
# binary images.
BINARIZE_SEED_TRAIN = 20140101
BINARIZE_SEED_EVAL = 20140102
IMAGE_SIZE = (28, 28)
NUM_CLASSES = 10
# Decoded splits by file identity (path, size, modification time) and data.verify, kept for
# the life of the process; at most both splits of both data sets (about 110 MB).
_DECODED: dict[tuple, tuple[Tensor, Tensor]] = {}
_DECODED_KEPT = 4


def _to_float(images: Tensor) -> Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return images.unsqueeze(1).float().div_(255.0)


def binarize_sample(images: Tensor, seed: int) -> Tensor:
    """One stochastic binarisation: each pixel is 1 with probability equal to its grey level."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    return torch.bernoulli(images, generator=generator)


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

    @checked("data")
    def __init__(
        self,
        dataset: Dataset = "mnist",
        data_dir: str | os.PathLike = "./data",
        batch_size: Annotated[int, Range(1)] = 128,
        eval_batch_size: Annotated[int, Range(1)] = 1000,
        val_size: Annotated[int, Range(0)] = 5000,
        binarize: Binarize = "none",
        download: bool = True,
        seed: int = 42,
        split_seed: int = 0,
        verify: bool = False,
    ):
        super().__init__()
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

    @property
    def class_names(self) -> list[str]:
        """The name of each label, e.g. ``"Trouser"`` for Fashion-MNIST's label 1."""
        return CLASS_NAMES[self.dataset]

    # -- finding and decoding the files -------------------------------------------------------

    @property
    def _folder(self) -> str:
        return DATASETS[self.dataset].__name__  # torchvision's folder name: MNIST, FashionMNIST

    def _missing_message(self, reason: str) -> str:
        env = os.environ.get("GENLAB_DATA_DIR")
        env_text = f"GENLAB_DATA_DIR={env!r}" if env else "GENLAB_DATA_DIR is not set"
        return (
            f"The {self._folder} data set was not found in {str(self.data_dir.resolve())!r} "
            f"(expected torchvision's layout, e.g. {self._folder}/raw/train-images-idx3-ubyte), "
            f"and {reason}. genlab reads data from data.data_dir, which defaults to the "
            f"GENLAB_DATA_DIR environment variable and then ./data ({env_text}). Point "
            f"data.data_dir=<folder> or GENLAB_DATA_DIR at a folder that holds the files, or "
            f"run with data.download=true on a machine with internet access."
        )

    def _files(self, train: bool) -> tuple[Path, Path]:
        """The split's image and label files, where torchvision keeps them."""
        raw = self.data_dir / self._folder / "raw"
        prefix = "train" if train else "t10k"
        return raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"

    def _decode(self, train: bool) -> tuple[Tensor, Tensor]:
        """Images as uint8 (N, 28, 28) and labels as int64, checked and decoded once per
        process: the jobs of a sweep, and the test pass after fit, share them."""
        # torchvision wants all four files of a data set before it reads any.
        if not all(path.is_file() for split in (True, False) for path in self._files(split)):
            self._download()
        images, labels_file = self._files(train)
        stats = [
            (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
            for p in (images, labels_file)
        ]
        key = (self.verify, *stats)
        if key not in _DECODED:
            check_pair(images, labels_file, IMAGE_SIZE)
            if self.verify:
                verify_official(self.dataset, self._folder, images, labels_file)
            split = DATASETS[self.dataset](self.data_dir, train=train, download=False)
            labels = split.targets.long()
            if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < NUM_CLASSES:
                raise GenlabError(
                    f"{str(labels_file)!r} holds labels outside 0..{NUM_CLASSES - 1}, so it is "
                    f"corrupt or not a {self.dataset} label file. Replace it with an intact copy."
                )
            while len(_DECODED) >= _DECODED_KEPT:
                _DECODED.pop(next(iter(_DECODED)))
            _DECODED[key] = (split.data, labels)
        return _DECODED[key]

    def _download(self) -> None:
        if not self.download:
            raise GenlabError(self._missing_message("data.download is false"))
        if not self.data_dir.exists() and not self.data_dir.parent.exists():
            raise GenlabError(
                self._missing_message(
                    "neither that folder nor its parent exists (a typo?), so no download was tried"
                )
            )
        raw = self.data_dir / self._folder / "raw"
        created = [folder for folder in (self.data_dir, raw.parent, raw) if not folder.exists()]
        try:
            DATASETS[self.dataset](self.data_dir, train=True, download=True)
        except Exception as err:  # no network, a read-only folder, a failing mirror
            # The folders torchvision made for the files it could not fetch go again.
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if still empty
            # torchvision lists every mirror it tried; the last line holds the final cause.
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise GenlabError(self._missing_message(f"downloading it failed ({reason})")) from err

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
            images, labels = self._decode(train=True)
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
                train_images = binarize_sample(train_images, BINARIZE_SEED_TRAIN)
            self.splits["train"] = (train_images.to(device), labels[train_idx].to(device))
            self.splits["val"] = self._eval_split(images[val_idx], labels[val_idx], device)
        if stage in (None, "test", "predict") and "test" not in self.splits:
            self.splits["test"] = self._eval_split(*self._decode(train=False), device)

    def _eval_split(
        self, images: Tensor, labels: Tensor, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        images = _to_float(images)
        if self.binarize != "none":
            images = binarize_sample(images, BINARIZE_SEED_EVAL)
        # A copy: the decoded labels are shared by every job of the process (_DECODED).
        return images.to(device), labels.to(device, copy=True)

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
