"""Evaluation metrics on tensors: likelihood bounds, latent statistics and probes of the
codes (FID and IS are in `genlab.fid`).

Everything here takes models and tensors; `genlab.evaluate` loads the
checkpoint and the data and decides which metrics apply to which family.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from genlab.models import VAE
from genlab.models.nets import IMAGE_PIXELS

log = logging.getLogger(__name__)

# Burda et al. (2016) count latent dimension d as active when Cov_x(E_q[z_d]) > 0.01.
ACTIVE_UNIT_THRESHOLD = 0.01


# -- likelihood ---------------------------------------------------------------------------------


@torch.no_grad()
def elbo_terms(
    vae: VAE, images: Tensor, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Per image: -log p(x|z) at one sample z ~ q(z|x), shape (N,), and the KL
    term per latent dimension, shape (N, latent_dim). Their sum is -ELBO."""
    recon, kl = [], []
    for x in images.split(batch_size):
        eps = torch.randn(
            x.size(0), vae.latent_dim, generator=generator, device=x.device, dtype=x.dtype
        )
        r, k = vae.elbo_terms(x, eps)
        recon.append(r)
        kl.append(k)
    return torch.cat(recon), torch.cat(kl)


@torch.no_grad()
def importance_sampled_nll(
    vae: VAE, images: Tensor, k: int, batch_size: int, generator: torch.Generator
) -> Tensor:
    """-log p(x) per image, estimated with ``k`` importance samples from q(z|x):

        log p(x) ~ log (1/k) sum_i p(x, z_i) / q(z_i | x),   z_i ~ q(z|x)

    an upper bound on -log p(x) in expectation that tightens as ``k`` grows
    (Burda et al., 2016). At most ``batch_size`` decodings are held at once:
    the k samples of an image are taken in chunks and combined with a running
    logsumexp, so memory does not grow with ``k``.
    """
    if k < 1:
        raise ValueError(f"k={k} importance samples: need at least 1")
    per_step = min(k, batch_size)
    images_per_step = max(1, batch_size // k)
    # Written in place: a small result tensor kept from each of thousands of
    # steps pins glibc's heap above that step's large temporaries, and the
    # process grew by megabytes per test image (over 20 GB at K = 5000).
    nll = torch.empty(images.size(0), device=images.device)
    log.info(
        "Estimating test/nll: %d test images, K = %d importance samples each...", len(images), k
    )
    began = time.perf_counter()
    # At K = 5000 this takes minutes: a progress bar on a terminal (disable=None: none in log files).
    with tqdm(total=images.size(0), desc=f"test/nll, K={k}", unit="image", disable=None) as bar:
        for start in range(0, images.size(0), images_per_step):
            x = images[start : start + images_per_step]
            log_sum = torch.full((x.size(0),), -math.inf, device=x.device)
            for done in range(0, k, per_step):
                log_w = vae.log_importance_weights(x, min(per_step, k - done), generator)
                log_sum = torch.logaddexp(log_sum, log_w.logsumexp(1))
            nll[start : start + x.size(0)] = math.log(k) - log_sum
            bar.update(x.size(0))
            done_images = start + x.size(0)
            quarter = 4 * done_images // images.size(0)
            if quarter > 4 * start // images.size(0) and done_images < images.size(0):
                # For the log file, where the bar does not go: a line each quarter.
                log.info(
                    "test/nll: %d of %d images (%.0f s)",
                    done_images,
                    images.size(0),
                    time.perf_counter() - began,
                )
    log.info("test/nll estimated in %.0f s.", time.perf_counter() - began)
    return nll


def bits_per_dim(nll_nats: float, dims: int = IMAGE_PIXELS) -> float:
    """A negative log-likelihood in nats per image as bits per pixel: the compression view."""
    return nll_nats / (dims * math.log(2))


def active_units(means: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """How many latent dims vary with the input: Cov_x(E_q[z_d]) > threshold (A_u of Burda et al.)."""
    return int((means.var(0) > threshold).sum())


# -- the encoder as a feature extractor ----------------------------------------------------------


def _standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def linear_probe_accuracy(
    train_codes: Tensor,
    train_labels: Tensor,
    test_codes: Tensor,
    test_labels: Tensor,
    steps: int = 100,
    weight_decay: float = 1e-4,
) -> float:
    """Test accuracy of a multinomial logistic regression fitted on standardised
    training codes (full-batch L-BFGS, a little L2 so separable codes converge)."""
    train_x, test_x = _standardise(train_codes.float(), test_codes.float())
    classes = int(train_labels.max()) + 1
    probe = nn.Linear(train_x.size(1), classes).to(train_x.device)
    nn.init.zeros_(probe.weight)  # the problem is convex: a fixed start makes the fit deterministic
    nn.init.zeros_(probe.bias)
    optimiser = torch.optim.LBFGS(
        probe.parameters(), max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(probe(train_x), train_labels)
        loss = loss + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    with torch.no_grad():
        return probe(test_x).argmax(1).eq(test_labels).float().mean().item()


@torch.no_grad()
def knn_accuracy(
    train_codes: Tensor,
    train_labels: Tensor,
    test_codes: Tensor,
    test_labels: Tensor,
    k: int,
    batch_size: int = 512,
) -> float:
    """Test accuracy of a k-nearest-neighbour vote (Euclidean, standardised codes;
    ties go to the smaller label)."""
    train_x, test_x = _standardise(train_codes.float(), test_codes.float())
    classes = int(train_labels.max()) + 1
    correct = 0
    for x, y in zip(test_x.split(batch_size), test_labels.split(batch_size)):
        neighbours = torch.cdist(x, train_x).topk(k, dim=1, largest=False).indices
        votes = F.one_hot(train_labels[neighbours], classes).sum(1)
        correct += int(votes.argmax(1).eq(y).sum())
    return correct / len(test_labels)
