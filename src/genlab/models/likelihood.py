"""-log p(x | z) of genlab's two decoders, per image, summed over pixels, in nats.

    bce   Bernoulli, mean sigmoid(l):             -log p(x|z) = sum_pixels softplus(l) - x l
    mse   Gaussian, mean sigmoid(l), variance 1/2: -log p(x|z) = sum_pixels (x - sigmoid(l))^2
                                                                 + log(pi) / 2

The Bernoulli likelihood is exact for binary x; on grey levels it is the usual
cross-entropy, not a normalised density. The Gaussian's optimised term is exactly the
squared error.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ReconLoss = Literal["bce", "mse"]
GAUSSIAN_NLL_PER_PIXEL = 0.5 * math.log(math.pi)


def reconstruction_nll(logits: Tensor, x: Tensor, recon_loss: ReconLoss) -> Tensor:
    """-log p(x | z) per example for decoder ``logits``, summed over the last three dims.

    ``x`` broadcasts against ``logits``: logits of shape (B, K, 1, 28, 28) score K
    decodings of each of B images given as (B, 1, 1, 28, 28).
    """
    if recon_loss == "mse":
        squared_error = (torch.sigmoid(logits) - x).pow(2).flatten(-3)
        return squared_error.sum(-1) + squared_error.size(-1) * GAUSSIAN_NLL_PER_PIXEL
    if logits.requires_grad:  # training: torch's fused kernel of softplus(l) - x l
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
