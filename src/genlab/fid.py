"""FID and IS without downloads: a small classifier of the data set, trained once from a
fixed seed and cached, stands in for Inception-v3. Its numbers compare only with each
other, for the same data set and classifier."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from genlab.atomic import write_atomically

# The FID classifier is trained once per data set, always from this seed.
log = logging.getLogger(__name__)

_CLASSIFIER_SEED = 0
# Bump when the classifier's architecture or training changes: cached files of older versions are ignored.
_CLASSIFIER_VERSION = 1


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
    log.info(
        "Training genlab's %s classifier for FID and IS (%g epochs; once, then read from %s)...",
        dataset,
        epochs,
        path,
    )
    start = time.perf_counter()
    model = train_classifier(*train, epochs=epochs)
    accuracy = model.accuracy(*test, batch_size=batch_size)
    log.info(
        "The classifier reached %.2f%% test accuracy in %.0f s.",
        100 * accuracy,
        time.perf_counter() - start,
    )
    info = {
        "dataset": dataset,
        "epochs": epochs,
        "seed": _CLASSIFIER_SEED,
        "test_accuracy": accuracy,
    }
    # Two runs may train the same classifier at once: the last one written wins, whole.
    write_atomically(path, lambda f: torch.save({**info, "state_dict": model.state_dict()}, f))
    write_atomically(path.with_suffix(".json"), json.dumps(info, indent=2))
    return model, accuracy, path


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
