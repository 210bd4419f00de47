"""-log p(x | z) of genlab's decoders, per image, summed over pixels, in nats.

    bce         Bernoulli, mean sigmoid(l):  -log p(x|z) = sum_pixels softplus(l) - x l
    cbernoulli  continuous Bernoulli:        -log p(x|z) = sum_pixels softplus(l) - x l - log C(l)
    mse         Gaussian, mean sigmoid(l),   -log p(x|z) = sum_pixels (x - sigmoid(l))^2
                variance 1/2:                                         + log(pi) / 2

The Bernoulli likelihood is exact for binary x; on grey levels it is the usual
cross-entropy, not a normalised density. The continuous Bernoulli (Loaiza-Ganem &
Cunningham, 2019) adds the log normaliser C(l) that makes the same expression a
density on [0, 1], so grey-level images get a true likelihood; its mean is not
sigmoid(l) (see `pixel_mean`). The Gaussian's optimised term is exactly the squared
error.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ReconLoss = Literal["bce", "cbernoulli", "mse"]
GAUSSIAN_NLL_PER_PIXEL = 0.5 * math.log(math.pi)


def likelihood_label(recon_loss: ReconLoss, binary: bool) -> str:
    """What -log p(x|z) of the decoder ``recon_loss`` measures on binary or grey-level pixels."""
    pixels = "binary pixels" if binary else "grey levels"
    if recon_loss == "bce":
        if binary:
            return "Bernoulli likelihood of binary pixels"
        return "Bernoulli cross-entropy of grey levels (not a normalised likelihood)"
    if recon_loss == "cbernoulli":
        return f"continuous Bernoulli density of {pixels} in [0, 1] (a density: it can be negative)"
    return f"Gaussian density (variance 1/2) of {pixels} (a density: it can be negative)"


# Below this |logit| the continuous Bernoulli's normaliser and mean are evaluated by their
# Taylor series: the closed forms divide 0 by 0 at logit 0 (lambda = 0.5). At the switch
# the series' first omitted terms are below 1e-9.
_CB_SERIES_BELOW = 0.1


def reconstruction_nll(logits: Tensor, x: Tensor, recon_loss: ReconLoss) -> Tensor:
    """-log p(x | z) per example for decoder ``logits``, summed over the last three dims.

    ``x`` broadcasts against ``logits``: logits of shape (B, K, 1, 28, 28) score K
    decodings of each of B images given as (B, 1, 1, 28, 28).
    """
    if recon_loss == "mse":
        squared_error = (torch.sigmoid(logits) - x).pow(2).flatten(-3)
        return squared_error.sum(-1) + squared_error.size(-1) * GAUSSIAN_NLL_PER_PIXEL
    cross_entropy = _bernoulli_nll(logits, x)
    if recon_loss == "cbernoulli":
        return cross_entropy - cb_log_normalizer(logits).flatten(-3).sum(-1)
    return cross_entropy


def pixel_mean(logits: Tensor, recon_loss: ReconLoss) -> Tensor:
    """The decoder's expected pixel values: sigmoid(l), or for the continuous Bernoulli
    its mean sigmoid(l) / tanh(l/2) - 1/l (0.5 at l = 0)."""
    if recon_loss != "cbernoulli":
        return torch.sigmoid(logits)
    small = logits.abs() < _CB_SERIES_BELOW
    safe = torch.where(small, torch.ones_like(logits), logits)
    closed = 0.5 / torch.tanh(0.5 * safe) + 0.5 - 1.0 / safe
    near = torch.where(small, logits, torch.zeros_like(logits))  # no inf * 0 in its gradient
    series = 0.5 + near / 12 - near.pow(3) / 720
    return torch.where(small, series, closed)


def cb_log_normalizer(logits: Tensor) -> Tensor:
    """log C(l) of the continuous Bernoulli with logit l, elementwise.

    C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda), which for lambda = sigmoid(l) is
    l / tanh(l / 2): even in l, log 2 at l = 0, where the series
    log 2 + l^2/12 - 7 l^4/1440 takes over.
    """
    magnitude = logits.abs()
    small = magnitude < _CB_SERIES_BELOW
    safe = torch.where(small, torch.ones_like(magnitude), magnitude)
    closed = torch.log(safe) - torch.log(torch.tanh(0.5 * safe))
    square = torch.where(small, logits, torch.zeros_like(logits)).pow(2)  # as in pixel_mean
    series = math.log(2.0) + square / 12 - 7.0 * square.pow(2) / 1440
    return torch.where(small, series, closed)


def _bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """sum_pixels softplus(l) - x l: the Bernoulli -log p(x|z) (cross-entropy on grey levels)."""
    # Training: torch's fused kernel of softplus(l) - x l. (Asked of autograd, not of the
    # tensor: inside torch.func.vmap a tensor reports requires_grad=False.)
    if torch.is_grad_enabled():
        bce = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
        return bce.flatten(-3).sum(-1)
    # Evaluation, often thousands of decodings per image: the same sum, with x l as an
    # inner product (no copies of x) and the cheaper softplus_sum.
    logits, x = logits.flatten(-3), x.flatten(-3)
    return softplus_sum(logits) - torch.einsum("...p,...p->...", logits, x)


# softplus_sum multiplies this many factors in [1/2, 1): at least 2^-112, inside float32's range.
_PRODUCT_GROUP = 112


@torch.no_grad()
def softplus_sum(logits: Tensor) -> Tensor:
    """``F.softplus(logits).sum(-1)`` in about two thirds of the time (no autograd).

    softplus(l) = max(l, 0) - log(sigmoid(|l|)), and the logs of a group of sigmoids
    are taken once, as the log of their product.
    """
    if logits.size(-1) % _PRODUCT_GROUP:
        return F.softplus(logits).sum(-1)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    factors = logits.abs()
    relu_sum = (logits.sum(-1) + factors.sum(-1)) * 0.5
    log_products = factors.sigmoid_().unflatten(-1, (-1, _PRODUCT_GROUP)).prod(-1).log_()
    return relu_sum - log_products.sum(-1)
