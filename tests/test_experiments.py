"""Named experiments trained in full (minutes on a CPU): `pytest -m slow`."""

from __future__ import annotations

import pytest

from genlab.train import train


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
