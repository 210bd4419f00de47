"""Many models of one family as one: their parameters padded to the largest latent size
and stacked along a new first dimension, the member dimension.

A member with ``latent_dim = d`` in a group padded to ``D`` keeps its own weights in the
first ``d`` code positions of each code head (a VAE's encoder ends in two heads, mean and
log-variance; an AE's in one) and zeros elsewhere. Its padded codes are then exactly
zero (zero weights give zero mean and log-variance, and the padded noise is zero), so
they add nothing to the KL and, through the decoder's zero columns, nothing to the
reconstruction; their gradients are exactly zero, so an elementwise optimiser (Adam)
never moves them. Each member is mathematically its own smaller model, and unstacking
gives back exactly its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def code_positions(latent_dim: int, padded_dim: int, heads: int, device: Any = None) -> Tensor:
    """Where a member's ``heads`` blocks of ``latent_dim`` codes sit among the padded
    ``heads`` blocks of ``padded_dim``."""
    return torch.cat(
        [h * padded_dim + torch.arange(latent_dim, device=device) for h in range(heads)]
    )


class Padding:
    """How one member's tensors sit inside the group's padded tensors of the same names."""

    def __init__(self, latent_dim: int, padded_dim: int, heads: int):
        self.latent_dim = latent_dim
        self.padded_dim = padded_dim
        self.heads = heads

    def _index(self, size: int, padded: int, name: str) -> Tensor | None:
        """The positions along one axis of ``size`` entries inside ``padded`` (None: same)."""
        if size == padded:
            return None
        d, big = self.latent_dim, self.padded_dim
        if size == self.heads * d and padded == self.heads * big:  # the encoder's code heads
            return code_positions(d, big, self.heads)
        if size == d and padded == big:  # the decoder's input
            return torch.arange(d)
        raise ValueError(f"{name}: {size} entries do not fit {padded} padded ones")

    def pad(self, name: str, tensor: Tensor, shape: Sequence[int]) -> Tensor:
        """``tensor`` (a member's) inside zeros of the padded ``shape``."""
        out = tensor.new_zeros(shape)
        indices = [self._index(s, p, name) for s, p in zip(tensor.shape, shape)]
        if all(index is None for index in indices):
            return out.copy_(tensor)
        grids = [
            torch.arange(size, device=out.device) if index is None else index.to(out.device)
            for size, index in zip(tensor.shape, indices)
        ]
        out[torch.meshgrid(*grids, indexing="ij")] = tensor
        return out

    def unpad(self, name: str, tensor: Tensor, shape: Sequence[int]) -> Tensor:
        """The member's entries (of ``shape``) of a padded ``tensor``."""
        for axis, (size, padded) in enumerate(zip(shape, tensor.shape)):
            index = self._index(size, padded, name)
            if index is not None:
                tensor = tensor.index_select(axis, index.to(tensor.device))
        return tensor.clone()


class MemberLayout:
    """The shapes of one member's tensors and where they sit in the group's."""

    def __init__(self, model: nn.Module, padding: Padding):
        self.padding = padding
        self.shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}

    def pad(self, name: str, tensor: Tensor, padded_shape: Sequence[int]) -> Tensor:
        return self.padding.pad(name, tensor, padded_shape)

    def unpad(self, name: str, tensor: Tensor) -> Tensor:
        return self.padding.unpad(name, tensor, self.shapes[name])


def stack(
    tensors: Sequence[dict[str, Tensor]],
    layouts: Sequence[MemberLayout],
    padded_shapes: dict[str, tuple[int, ...]],
) -> dict[str, Tensor]:
    """One tensor per name: the members' tensors, padded, along a new first axis."""
    return {
        name: torch.stack(
            [layout.pad(name, member[name], shape) for member, layout in zip(tensors, layouts)]
        )
        for name, shape in padded_shapes.items()
    }


def unstack(stacked: dict[str, Tensor], layout: MemberLayout, index: int) -> dict[str, Tensor]:
    """Member ``index``'s own tensors, by name, out of stacked ones."""
    return {name: layout.unpad(name, tensor[index]) for name, tensor in stacked.items()}
