"""Encoder and decoder networks for 1x28x28 images.

A net config (``model/net``) is a small factory: the model family asks it for
an encoder with as many outputs as it needs (VAE: 2 x latent_dim, GAN
discriminator: 1) and a decoder from its latent size. Decoders return logits
of shape (B, 1, 28, 28); ``torch.sigmoid`` turns them into pixel means.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from genlab.options import Length, NonEmpty, Range, checked

IMAGE_SHAPE = (1, 28, 28)
IMAGE_PIXELS = 28 * 28

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}
Activation = Literal[tuple(ACTIVATIONS)]
# Normalisation of the decoder's hidden layers (before their activation).
Norm = Literal["none", "batch"]
HiddenDims = Annotated[Sequence[Annotated[int, Range(1)]], NonEmpty()]


class _Net:
    """Holds what both kinds of net are configured by."""

    def __init__(self, hidden_dims: Sequence[int], activation: str, norm: str):
        self.hidden_dims = [int(d) for d in hidden_dims]
        self.activation = activation
        self.norm = norm

    # MLP and Conv normalise decoders only. A GAN's generator needs batch norm to
    # keep its samples apart (without it the default GAN collapses to one image);
    # in an encoder or discriminator, batch statistics would differ between
    # training and evaluation and between real and generated batches. (DCGAN
    # follows its paper instead, and normalises its discriminator too.)
    def _hidden(self, features: int, decoder: bool, batch_norm: type[nn.Module]) -> list[nn.Module]:
        """Normalisation (decoders, where configured) and activation of a hidden layer."""
        layers = [batch_norm(features)] if decoder and self.norm == "batch" else []
        return [*layers, ACTIVATIONS[self.activation]()]


class MLP(_Net):
    """Fully connected nets: 784 -> hidden_dims -> out, and in -> reversed(hidden_dims) -> 784."""

    @checked("model.net")
    def __init__(
        self,
        hidden_dims: HiddenDims = (512, 256),
        activation: Activation = "relu",
        norm: Norm = "none",
    ):
        super().__init__(hidden_dims, activation, norm)

    def _stack(self, widths: list[int], decoder: bool) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(widths) - 2:
                layers += self._hidden(n_out, decoder, nn.BatchNorm1d)
        return layers

    def encoder(self, out_features: int) -> nn.Module:
        widths = [IMAGE_PIXELS, *self.hidden_dims, out_features]
        return nn.Sequential(nn.Flatten(), *self._stack(widths, decoder=False))

    def decoder(self, in_features: int) -> nn.Module:
        widths = [in_features, *reversed(self.hidden_dims), IMAGE_PIXELS]
        return nn.Sequential(*self._stack(widths, decoder=True), nn.Unflatten(1, IMAGE_SHAPE))


class Conv(_Net):
    """Convolutional nets; ``hidden_dims`` are channel counts.

    The first two conv layers halve the resolution (28 -> 14 -> 7), later ones
    keep it; a linear layer maps the flattened feature map to ``out``. The
    decoder mirrors this with transposed convolutions.
    """

    @checked("model.net")
    def __init__(
        self,
        hidden_dims: HiddenDims = (32, 64),
        activation: Activation = "relu",
        norm: Norm = "none",
    ):
        super().__init__(hidden_dims, activation, norm)

    def _strides(self) -> list[int]:
        return [2 if i < 2 else 1 for i in range(len(self.hidden_dims))]

    def _feature_shape(self) -> tuple[int, int, int]:
        side = IMAGE_SHAPE[1] // 2 ** min(2, len(self.hidden_dims))
        return self.hidden_dims[-1], side, side

    def encoder(self, out_features: int) -> nn.Module:
        layers: list[nn.Module] = []
        channels = [IMAGE_SHAPE[0], *self.hidden_dims]
        for c_in, c_out, stride in zip(channels[:-1], channels[1:], self._strides()):
            kernel = 4 if stride == 2 else 3
            layers.append(nn.Conv2d(c_in, c_out, kernel, stride, padding=1))
            layers += self._hidden(c_out, False, nn.BatchNorm2d)
        c, h, w = self._feature_shape()
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, out_features))

    def decoder(self, in_features: int) -> nn.Module:
        c, h, w = self._feature_shape()
        layers: list[nn.Module] = [
            nn.Linear(in_features, c * h * w),
            *self._hidden(c * h * w, True, nn.BatchNorm1d),
            nn.Unflatten(1, (c, h, w)),
        ]
        channels = [*reversed(self.hidden_dims), IMAGE_SHAPE[0]]
        strides = list(reversed(self._strides()))
        for i, (c_in, c_out, stride) in enumerate(zip(channels[:-1], channels[1:], strides)):
            if stride == 2:
                layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, padding=1))
            else:
                layers.append(nn.Conv2d(c_in, c_out, 3, 1, padding=1))
            if i < len(strides) - 1:
                layers += self._hidden(c_out, True, nn.BatchNorm2d)
        return nn.Sequential(*layers)


class DCGAN(_Net):
    """The convolutional GAN of Radford et al. (2016), sized for 28x28 images.

    Generator (``decoder``): linear -> channels[-1] x 7 x 7, then transposed
    convolutions that double the resolution (7 -> 14 -> 28), with ReLU. The
    discriminator (``encoder``): strided convolutions that halve it (28 -> 14 -> 7)
    and a linear layer to ``out``, with ``activation`` (the paper's LeakyReLU(0.2)).
    ``norm=batch`` puts batch norm in every hidden layer but the discriminator's
    first, as the paper does. Weights start from N(0, 0.02) and batch-norm scales
    from N(1, 0.02). Exactly two stages: 28 = 7 x 2 x 2.
    """

    @checked("model.net")
    def __init__(
        self,
        hidden_dims: Annotated[Sequence[Annotated[int, Range(1)]], Length(2)] = (64, 128),
        activation: Activation = "leaky_relu",
        norm: Norm = "batch",
    ):
        super().__init__(hidden_dims, activation, norm)

    def _normed(self, layer: nn.Module, features: int, batch_norm: type[nn.Module]) -> list:
        """``layer`` followed by batch norm where configured (the norm makes its bias redundant)."""
        if self.norm != "batch":
            return [layer]
        layer.bias = None
        return [layer, batch_norm(features)]

    def encoder(self, out_features: int) -> nn.Module:
        c1, c2 = self.hidden_dims
        act = ACTIVATIONS[self.activation]
        return _dcgan_init(
            nn.Sequential(
                nn.Conv2d(IMAGE_SHAPE[0], c1, 4, 2, padding=1),
                act(),
                *self._normed(nn.Conv2d(c1, c2, 4, 2, padding=1), c2, nn.BatchNorm2d),
                act(),
                nn.Flatten(),
                nn.Linear(c2 * 7 * 7, out_features),
            )
        )

    def decoder(self, in_features: int) -> nn.Module:
        c1, c2 = self.hidden_dims
        return _dcgan_init(
            nn.Sequential(
                *self._normed(nn.Linear(in_features, c2 * 7 * 7), c2 * 7 * 7, nn.BatchNorm1d),
                nn.ReLU(),
                nn.Unflatten(1, (c2, 7, 7)),
                *self._normed(nn.ConvTranspose2d(c2, c1, 4, 2, padding=1), c1, nn.BatchNorm2d),
                nn.ReLU(),
                nn.ConvTranspose2d(c1, IMAGE_SHAPE[0], 4, 2, padding=1),
            )
        )


def _dcgan_init(net: nn.Sequential) -> nn.Sequential:
    """Radford et al.'s initialisation: weights N(0, 0.02), batch-norm scales N(1, 0.02)."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)
    return net


# The nets a model family accepts as ``model.net``.
Net = MLP | Conv | DCGAN


def _negative_slope(module: nn.Module) -> float | None:
    """Slope below zero of an activation that is linear on each side of zero, else None."""
    if isinstance(module, nn.ReLU):
        return 0.0
    if isinstance(module, nn.LeakyReLU):
        return float(module.negative_slope)
    return None


def decode_cloud(decoder: nn.Module, z: Tensor) -> Tensor:
    """``decoder(z)`` for a tight cloud of codes ``z`` (N, latent_dim), e.g. many
    samples of one image's posterior, computed with far fewer flops.

    When the decoder opens with Linear -> ReLU (or LeakyReLU) -> Linear, every
    hidden unit that keeps one side of zero over the whole cloud is linear in
    z there, so all such units fold into one (out x latent_dim) matrix. Only
    the units that switch sign inside the cloud are evaluated per code. For
    the seed VAE's posteriors that is about 30 of 256 units, so the big
    matmul shrinks about sevenfold. The result equals ``decoder(z)`` up to
    float rounding; decoders of any other shape are simply called.
    """
    layers = list(decoder) if isinstance(decoder, nn.Sequential) else []
    if len(layers) < 3 or not (
        isinstance(layers[0], nn.Linear) and isinstance(layers[2], nn.Linear)
    ):
        return decoder(z)
    first, second = layers[0], layers[2]
    slope = _negative_slope(layers[1])
    if slope is None or first.bias is None or second.bias is None:
        return decoder(z)
    # Hidden units as rows, so that the reductions over the cloud run along memory.
    pre = torch.addmm(first.bias.unsqueeze(1), first.weight, z.T)
    always_on = pre.amin(dim=1) > 0  # (aminmax is ten times slower than these two)
    switching = (pre.amax(dim=1) > 0) & ~always_on
    # Slope of each fixed unit over the cloud: 1 if always on, `slope` if always off.
    fixed_slope = torch.where(always_on, 1.0, slope).masked_fill(switching, 0.0)
    w_fixed = second.weight * fixed_slope  # (out, hidden)
    # One matmul, with the bias as a column of the weight (saves a pass over the output).
    weight = torch.cat(
        [
            w_fixed @ first.weight,
            (w_fixed @ first.bias + second.bias).unsqueeze(1),
            second.weight[:, switching],
        ],
        dim=1,
    )
    features = torch.cat([z.T, z.new_ones(1, z.size(0)), layers[1](pre[switching])])
    out = features.T @ weight.T
    for layer in layers[3:]:
        out = layer(out)
    return out
