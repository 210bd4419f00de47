"""Batches served from tensors already in memory (on the training device), the way
Lightning expects a DataLoader to serve them: shuffled per epoch from a seed, shared
between processes under DDP, and resumable mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


def _mix(seed: int, epoch: int) -> int:
    # Distinct (seed, epoch) pairs get distinct streams: seed 1 at epoch 0 must not replay seed 0 at epoch 1.
    return (seed * 1_000_003 + epoch) % (2**63)


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
