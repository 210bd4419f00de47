"""FID and IS on genlab's own classifier: their definitions, known answers, and the cache."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch

from genlab import fid
from genlab.config import compose_config
from genlab.data import ImageDataModule
from genlab.models import VAE
from genlab.models.nets import MLP

ADAM = partial(torch.optim.Adam, lr=1e-3)


def test_inception_score_spans_one_to_the_number_of_classes():
    assert fid.inception_score(torch.zeros(100, 10)) == pytest.approx(1.0)
    confident = 50.0 * torch.eye(10).repeat(10, 1)  # each class equally often, certainly
    assert fid.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    assert fid.inception_score(50.0 * torch.eye(10)[[3] * 100]) == pytest.approx(1.0)


def _classifier(cache_dir, mnist_full):
    train, test = mnist_full.splits["train"], mnist_full.splits["test"]
    return fid.cached_classifier(cache_dir, "mnist", 0.1, train, test, batch_size=4096)


def test_fid_is_zero_for_the_test_set_itself_and_large_for_noise(cache_dir, mnist_full):
    classifier, accuracy, _ = _classifier(cache_dir, mnist_full)
    assert accuracy > 0.8  # the fast suite's short-trained classifier
    test = mnist_full.splits["test"][0][:2000]
    distance = fid.ClassifierFID(classifier, test, batch_size=1000)
    floor = distance(mnist_full.splits["train"][0][:2000])
    noise = torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert abs(distance(test)) < 1e-3
    assert floor > 1e-3
    assert distance(noise) > 100 * floor
    # Reusing the metric does not mix image sets: the same set scores the same again.
    assert distance(test) == pytest.approx(distance(test), abs=1e-6)


def test_fid_of_a_vae_falls_as_it_trains(cache_dir, mnist_full):
    classifier, _, _ = _classifier(cache_dir, mnist_full)
    images = mnist_full.splits["train"][0]
    distance = fid.ClassifierFID(classifier, mnist_full.splits["test"][0][:1000], batch_size=1000)
    torch.manual_seed(0)
    vae = VAE(MLP([256]), ADAM, latent_dim=8)
    optimiser = vae.configure_optimizers()
    scores = []
    for start, stop in ((0, 0), (0, 30), (30, 300)):  # FID after 0, 30 and 300 steps
        for step in range(start, stop):
            batch = images[step * 128 : (step + 1) * 128]
            loss = vae.step((batch, None), step, "train")["loss"]
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        scores.append(distance(vae.sample(1000, generator=torch.Generator().manual_seed(0))))
    assert scores[0] > scores[1] > scores[2], scores


def test_the_classifier_is_trained_once_then_read_from_the_cache(
    tmp_path, monkeypatch, mnist_full, caplog
):
    caplog.set_level(logging.INFO, logger="genlab")
    train = tuple(t[:3000] for t in mnist_full.splits["train"])
    test = tuple(t[:1000] for t in mnist_full.splits["test"])
    first, accuracy, path = fid.cached_classifier(tmp_path, "mnist", 0.2, train, test, 1000)
    assert path.is_file() and path.parent == tmp_path
    said = [r.getMessage() for r in caplog.records]  # the first use says why it takes a while
    assert (
        f"Training genlab's mnist classifier for FID and IS (0.2 epochs; once, then read from {path})..."
        in said
    )
    assert f"The classifier reached {100 * accuracy:.2f}% test accuracy" in said[-1]
    assert f'"test_accuracy": {accuracy}' in path.with_suffix(".json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was trained again")

    monkeypatch.setattr(fid, "train_classifier", no_training)
    again, cached_accuracy, same_path = fid.cached_classifier(
        tmp_path, "mnist", 0.2, train, test, 1000
    )
    assert same_path == path and cached_accuracy == accuracy
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # Another setting is another classifier.
    with pytest.raises(AssertionError, match="trained again"):
        fid.cached_classifier(tmp_path, "mnist", 0.3, train, test, 1000)


@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "target"), [("mnist", 0.99), ("fashion_mnist", 0.90)])
def test_the_fid_classifier_reaches_its_target_accuracy(tmp_path, data_dir, dataset, target):
    epochs = compose_config(config_name="eval").eval.classifier_epochs
    datamodule = ImageDataModule(dataset, data_dir, val_size=0, download=False)
    datamodule.setup()
    train, test = datamodule.splits["train"], datamodule.splits["test"]
    _, accuracy, _ = fid.cached_classifier(tmp_path, dataset, epochs, train, test, 4096)
    assert accuracy >= target
