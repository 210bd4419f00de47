"""The start-up check: bad configs are refused before anything is built, in one paragraph."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from genlab.config import compose_config
from genlab.config.validate import check_training_setup, validate
from genlab.errors import GenlabError


def check(*overrides: str) -> None:
    """Compose and validate as genlab-train does before it reads any data."""
    cfg = compose_config(["paths.output_dir=/unused", *overrides])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    validate(resolved)
    check_training_setup(resolved, instantiate(cfg.model))


# (overrides, words the message must contain). The first ten are the ones every
# user-facing error promise starts from; the rest cover each kind of check.
BAD_CONFIGS = [
    ("model=vea", ["model=vea", "ae, gan, vae", "did you mean vae"]),
    ("data=cifar", ["data=cifar", "fashion_mnist, mnist"]),
    ("model.latent_dim=0", ["model.latent_dim=0", ">= 1"]),
    ("model.latent_dim=-3", ["model.latent_dim=-3", ">= 1"]),
    ("model.beta=-1", ["model.beta=-1", ">= 0"]),
    ("model.latnet_dim=4", ["model.latnet_dim", "did you mean latent_dim"]),
    ("data.batch_size=abc", ["data.batch_size='abc'", "integer"]),
    ("trainer.max_epochs=-5", ["trainer.max_epochs=-5", ">= -1"]),
    ("model.optimizer.lr=0", ["model.optimizer.lr=0", "> 0"]),
    ("model.latent_dim=2.5", ["model.latent_dim=2.5", "integer"]),
    ("+model.latnet_dim=4", ["model.latnet_dim", "genlab.models.VAE", "did you mean latent_dim"]),
    ("model/net=transformer", ["model/net=transformer", "conv, dcgan, mlp"]),
    ("experiment=seed_vae", ["experiment=seed_vae", "seed_vae_mnist"]),
    ("modle=vae", ["modle", "did you mean model"]),
    ("model=gan model.beta=4", ["model.beta", "latent_dim, net, optimizer"]),
    ("data.binarize=yes", ["data.binarize='yes'", "none, dynamic, static"]),
    ("model.recon_loss=l1", ["model.recon_loss='l1'", "bce, cbernoulli, mse"]),
    ("model.net.activation=swish", ["model.net.activation='swish'", "leaky_relu"]),
    ("model.net.hidden_dims=[a,b]", ["model.net.hidden_dims", "list of integers"]),
    ("data.download=maybe", ["data.download='maybe'", "true or false"]),
    ("data.val_size=-1", ["data.val_size=-1", ">= 0"]),
    ("seed=-1", ["seed=-1", "between 0 and 4294967295"]),
    ("resume=3", ["resume=3", "last"]),
    ("++trainer.limt_train_batches=3", ["trainer.limt_train_batches", "limit_train_batches"]),
    ("trainer.precision=33", ["trainer.precision=33", "bf16-mixed"]),
    ("++model.optimizer.lrr=0.1", ["model.optimizer.lrr", "did you mean lr"]),
    ("callbacks.last_checkpoint.every_n_train_steps=0", ["every_n_train_steps=0", ">= 1"]),
    ("model=gan trainer.gradient_clip_val=1", ["trainer.gradient_clip_val=1", "manual"]),
    ("model=gan ++trainer.accumulate_grad_batches=2", ["accumulate_grad_batches=2", "manual"]),
    ("model=gan callbacks=default", ["monitor='val/loss'", "val/d_loss", "last_checkpoint_only"]),
    ("callbacks.model_checkpoint.monitor=val/elbo", ["val/elbo", "val/neg_elbo"]),
    ("model.latent_dim=2,4", ["model.latent_dim=2,4", "--multirun"]),
    ("logger=null", ["logger=null", "csv, tensorboard", "~logger"]),
    (
        "model.recon_loss=cbernoulli data.binarize=dynamic",
        ["recon_loss='cbernoulli'", "data.binarize='dynamic'", "data.binarize=none"],
    ),
    ("model.ema_decay=0.999", ["model.ema_decay", "latent_dim, net, optimizer"]),
    ("model=gan model.ema_decay=1.5", ["model.ema_decay=1.5", "between 0 and 1"]),
]


@pytest.mark.parametrize(("overrides", "words"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configs_are_one_paragraph_naming_the_value_and_the_choices(overrides, words):
    with pytest.raises(GenlabError) as err:
        check(*overrides.split())
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_every_problem_is_reported_at_once():
    with pytest.raises(GenlabError) as err:
        check("model.latent_dim=0", "model.beta=-2", "data.batch_size=x")
    message = str(err.value)
    assert "model.latent_dim=0" in message and "model.beta=-2" in message
    assert "data.batch_size='x'" in message


@pytest.mark.parametrize(
    "overrides",
    [
        "",
        "model=gan",
        "model=ae model/net=conv data=fashion_mnist",
        "experiment=seed_vae_mnist",
        "trainer.max_epochs=-1 trainer.precision=bf16-mixed ++trainer.limit_train_batches=0.5",
        "trainer.max_epochs=null trainer.gradient_clip_val=0.5 trainer.deterministic=true",
        "model.beta=0 model.optimizer.lr=3e-4 ++model.optimizer.weight_decay=0.01",
        "callbacks.model_checkpoint.monitor=val/neg_elbo callbacks.progress_bar=null",
        "logger=csv callbacks.last_checkpoint.every_n_train_steps=100 resume=last",
        # Keys genlab does not define stay free: other objects' arguments, new sections.
        "++logger.flush_secs=5 +notes.purpose=baseline +paths.scratch_dir=/tmp/scratch",
        "eval.after_fit=true eval.nll_samples=10 paths.cache_dir=/tmp/cache objective=val/loss",
        "trainer=ddp trainer.accelerator=cpu callbacks.images.every_n_epochs=0 +sweep=latent_beta",
    ],
)
def test_valid_configs_pass(overrides):
    check(*overrides.split())


def test_the_shipped_configs_match_their_targets():
    # Each group choice, validated against the signatures it instantiates.
    for group, choices in {"model": ["ae", "vae", "gan"], "model/net": ["mlp", "conv"]}.items():
        for choice in choices:
            check(f"{group}={choice}")
