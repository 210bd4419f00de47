"""Named experiments: each composes to what its file says and trains; in full
(minutes on a CPU) under `pytest -m slow`."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from genlab.config import CONF_DIR, compose_config
from genlab.train import train

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_every_documented_experiment_exists():
    documented = {
        "seed_vae_mnist",
        "seed_vae_mnist_no_kl",
        "vae_mnist_nll",
        "ae_fashion",
        "gan_mnist",
        "gan_fashion",
        "dcgan_mnist",
        "dcgan_fashion",
        "iwae_mnist_nll",
        "latent_beta_sweep",
    }
    assert documented == set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_trains(make_cfg, name):
    metrics = train(
        make_cfg(f"experiment={name}", "trainer.max_epochs=1", "eval.test_examples=200")
    )
    assert metrics["status"] == "completed" and metrics["epochs"] == 1


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "seed_vae_mnist",
            {
                "model.latent_dim": 2,
                "model.net.hidden_dims": [256],
                "data.batch_size": 128,
                "trainer.max_epochs": 20,
                "model.beta": 1.0,
            },
        ),
        ("seed_vae_mnist_no_kl", {"model.latent_dim": 2, "model.beta": 0.0}),
        (
            "vae_mnist_nll",
            {
                "data.binarize": "dynamic",
                "model.latent_dim": 50,
                "model.net.hidden_dims": [200, 200],
                "model.net.activation": "tanh",
                "model.scheduler.T_max": 450,
            },
        ),
        ("gan_fashion", {"data.dataset": "fashion_mnist", "model.net.norm": "batch"}),
        (
            "iwae_mnist_nll",
            {"model.iw_samples": 50, "model.latent_dim": 50, "data.binarize": "dynamic"},
        ),
        (
            "dcgan_fashion",
            {
                "data.dataset": "fashion_mnist",
                "model.net._target_": "genlab.models.nets.DCGAN",
                "model.optimizer.betas": [0.5, 0.999],
            },
        ),
        ("latent_beta_sweep", {"model._target_": "genlab.models.VAE", "eval.after_fit": True}),
    ],
)
def test_experiments_set_what_their_files_say(name, expected):
    cfg = compose_config([f"experiment={name}"])
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key


@pytest.mark.slow
def test_seed_vae_reaches_its_known_bound(make_cfg):
    cfg = make_cfg(
        "experiment=seed_vae_mnist",
        "trainer.max_epochs=20",
        "++trainer.limit_train_batches=1.0",
        "++trainer.limit_val_batches=1.0",
        "++trainer.limit_test_batches=1.0",
    )
    metrics = train(cfg)
    assert metrics["epochs"] == 20
    # A 2-D latent VAE on grey-level MNIST ends near 155 nats; an untrained one scores ~543.
    assert metrics["test/neg_elbo"] < 160
    assert 3.0 < metrics["test/kl"] < 10.0
