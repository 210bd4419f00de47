"""Evaluation metrics on tensors: likelihood bounds, latent statistics, probes,
and a Frechet distance on the features of a small classifier.

Everything here takes models and tensors; `genlab.evaluate` loads the
checkpoint and the data and decides which metrics apply to which family.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from genlab.models import VAE
from genlab.models.nets import IMAGE_PIXELS

# Burda et al. (2016) count latent dimension d as active when Cov_x(E_q[z_d]) > 0.01.
ACTIVE_UNIT_THRESHOLD = 0.01
# The FID classifier is trained once per data set, always from this seed.
_CLASSIFIER_SEED = 0
# Bump when the classifier's architecture or training changes: cached files of older versions are ignored.
_CLASSIFIER_VERSION = 1


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


# -- the classifier behind FID and IS ------------------------------------------------------------


class _Features(nn.Sequential):
    """The classifier's penultimate layer; torchmetrics reads ``num_features``."""

    num_features = 128


class FeatureClassifier(nn.Module):
    """A small CNN for 1x28x28 images: two conv + pool stages, a 128-unit
    feature layer (what FID compares) and a linear head over 10 classes."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = _Features(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, _Features.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(_Features.num_features, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits."""
        return self.head(self.features(x))

    @torch.no_grad()
    def logits(self, images: Tensor, batch_size: int) -> Tensor:
        return torch.cat([self(x) for x in images.split(batch_size)])

    def accuracy(self, images: Tensor, labels: Tensor, batch_size: int) -> float:
        return self.logits(images, batch_size).argmax(1).eq(labels).float().mean().item()


def train_classifier(
    images: Tensor, labels: Tensor, epochs: float, batch_size: int = 128
) -> FeatureClassifier:
    """Fit a `FeatureClassifier` with Adam and a one-cycle learning rate, from a fixed seed.

    ``epochs`` may be fractional (0.1: a tenth of one pass over the data).
    """
    generator = torch.Generator(device=images.device).manual_seed(_CLASSIFIER_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_CLASSIFIER_SEED)
        model = FeatureClassifier().to(images.device)
    steps_per_epoch = len(images) // batch_size
    total = max(1, round(epochs * steps_per_epoch))
    optimiser = torch.optim.Adam(model.parameters())
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=total)
    model.train()
    step = 0
    while step < total:
        order = torch.randperm(len(images), generator=generator, device=images.device)
        for idx in order[: steps_per_epoch * batch_size].view(-1, batch_size)[: total - step]:
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            step += 1
    return model.eval()


def cached_classifier(
    cache_dir: Path,
    dataset: str,
    epochs: float,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    batch_size: int,
) -> tuple[FeatureClassifier, float, Path]:
    """The FID classifier of ``dataset`` and its test accuracy, trained on ``train``
    on first use and then read from ``cache_dir``; also returns the cached file.

    Its test accuracy is stored beside it in a .json file of the same name.
    """
    name = f"classifier-{dataset}-v{_CLASSIFIER_VERSION}-epochs{epochs:g}-seed{_CLASSIFIER_SEED}"
    path = cache_dir / f"{name}.pt"
    device = train[0].device
    if path.is_file():
        saved = torch.load(path, map_location=device, weights_only=True)
        model = FeatureClassifier().to(device)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["test_accuracy"], path
    model = train_classifier(*train, epochs=epochs)
    accuracy = model.accuracy(*test, batch_size=batch_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "dataset": dataset,
        "epochs": epochs,
        "seed": _CLASSIFIER_SEED,
        "test_accuracy": accuracy,
    }
    _write_atomic(path, lambda f: torch.save({**info, "state_dict": model.state_dict()}, f))
    _write_atomic(path.with_suffix(".json"), lambda f: f.write(json.dumps(info, indent=2).encode()))
    return model, accuracy, path


def _write_atomic(path: Path, write) -> None:
    # Two runs may train the same classifier at once: each writes its own file, the last rename wins.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        write(f)
    os.replace(tmp, path)


class ClassifierFID:
    """Frechet distance between the classifier's features of a fixed reference
    set and of any image set (torchmetrics' FID with this classifier in place of Inception)."""

    def __init__(self, classifier: FeatureClassifier, reference: Tensor, batch_size: int):
        self.batch_size = batch_size
        self.metric = FrechetInceptionDistance(
            feature=classifier.features, reset_real_features=False
        ).to(reference.device)
        with torch.no_grad():
            for x in reference.split(batch_size):
                self.metric.update(x, real=True)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> float:
        self.metric.reset()  # forgets the previous image set, keeps the reference
        for x in images.split(self.batch_size):
            self.metric.update(x, real=False)
        return self.metric.compute().item()


def inception_score(logits: Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over all images at once: 1 when every image
    gets the same prediction, the number of classes when each is confidently
    one class and the classes are equally frequent."""
    log_p = logits.double().log_softmax(1)
    log_marginal = log_p.exp().mean(0).log()
    kl = (log_p.exp() * (log_p - log_marginal)).sum(1)
    return kl.mean().exp().item()
