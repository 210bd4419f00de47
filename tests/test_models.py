"""Networks and model families: shapes, the loss terms against their definitions, bad input."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, ContinuousBernoulli, Normal, kl_divergence

from genlab.errors import GenlabError, TrainingDiverged
from genlab.models import AE, GAN, VAE
from genlab.models.likelihood import (
    cb_log_normalizer,
    pixel_mean,
    reconstruction_nll,
    softplus_sum,
)
from genlab.models.nets import DCGAN, MLP, Conv, decode_cloud

ADAM = partial(torch.optim.Adam, lr=1e-3)
NETS = [MLP([64, 32]), MLP([16]), Conv([8, 16]), Conv([8]), Conv([4, 8, 8]), DCGAN([8, 16])]


@pytest.mark.parametrize("net", NETS, ids=lambda n: f"{type(n).__name__}{n.hidden_dims}")
def test_nets_map_images_to_features_and_back(net):
    x = torch.rand(5, 1, 28, 28)
    assert net.encoder(7)(x).shape == (5, 7)
    assert net.decoder(3)(torch.randn(5, 3)).shape == (5, 1, 28, 28)


@pytest.mark.parametrize(
    "net", [MLP([32]), Conv([8, 16]), DCGAN([8, 16])], ids=["mlp", "conv", "dcgan"]
)
def test_families_produce_images_of_the_right_shape(net):
    x = torch.rand(4, 1, 28, 28)
    assert AE(net, ADAM, latent_dim=3)(x).shape == x.shape
    vae = VAE(net, ADAM, latent_dim=3)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (4, 3)
    assert vae(x).shape == x.shape
    for model in (vae, GAN(net, ADAM, latent_dim=5)):
        samples = model.sample(6)
        assert samples.shape == (6, 1, 28, 28)
        assert 0.0 <= samples.min() and samples.max() <= 1.0


def test_vae_terms_match_their_definitions():
    torch.manual_seed(0)
    vae = VAE(MLP([32]), ADAM, latent_dim=4, beta=4.0)
    x = torch.rand(8, 1, 28, 28).round()
    metrics = vae.step((x, torch.zeros(8)), batch_idx=0, split="val")

    mu, logvar = vae.encode(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    kl = kl_divergence(q, Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(metrics["kl"], kl)
    torch.testing.assert_close(metrics["neg_elbo"], metrics["recon"] + metrics["kl"])
    torch.testing.assert_close(metrics["loss"], metrics["recon"] + 4.0 * metrics["kl"])

    # Evaluation noise is fixed per batch index, so evaluating twice gives the same numbers.
    again = vae.step((x, torch.zeros(8)), batch_idx=0, split="val")
    torch.testing.assert_close(again["loss"], metrics["loss"])


def test_reconstruction_nll_is_a_log_likelihood_in_nats():
    logits, x = torch.randn(3, 1, 28, 28), torch.rand(3, 1, 28, 28).round()
    bernoulli = -Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(reconstruction_nll(logits, x, "bce"), bernoulli)
    gaussian = -Normal(torch.sigmoid(logits), math.sqrt(0.5)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(reconstruction_nll(logits, x, "mse"), gaussian)


def test_softplus_sum_matches_softplus_over_the_whole_float_range():
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(50, 784) * 5, torch.randn(50, 784) * 100 - 50])
    expected = torch.nn.functional.softplus(logits.double()).sum(-1)
    torch.testing.assert_close(softplus_sum(logits).double(), expected, rtol=1e-6, atol=1e-3)
    # Half precision logits are summed in float32; other widths take the plain route.
    torch.testing.assert_close(
        softplus_sum(logits.bfloat16()).double(),
        torch.nn.functional.softplus(logits.bfloat16().double()).sum(-1),
        rtol=1e-6,
        atol=1e-3,
    )
    narrow = logits[:, :100]
    torch.testing.assert_close(
        softplus_sum(narrow).double(),
        torch.nn.functional.softplus(narrow.double()).sum(-1),
        rtol=1e-6,
        atol=1e-3,
    )


@pytest.mark.parametrize(
    "net",
    [MLP([32]), MLP([64, 32]), MLP([32], "leaky_relu"), MLP([32], "tanh"), Conv([8, 16])],
    ids=["relu", "deeper", "leaky_relu", "tanh", "conv"],
)
@pytest.mark.parametrize("spread", [0.01, 0.1, 3.0])
def test_decode_cloud_equals_the_decoder(net, spread):
    torch.manual_seed(0)
    decoder = net.decoder(2)
    z = torch.randn(2) + spread * torch.randn(500, 2)
    with torch.no_grad():
        torch.testing.assert_close(decode_cloud(decoder, z), decoder(z), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", [AE, VAE, GAN], ids=lambda f: f.__name__)
def test_compile_compiles_every_network_in_place(family):
    model = family(MLP([16]), ADAM, latent_dim=2, compile=True)
    names = list(model.state_dict())
    model.configure_model()
    model.configure_model()  # Lightning calls it again for test: compiled once
    nets = list(model.children())
    assert nets and all(net._compiled_call_impl is not None for net in nets)
    assert list(model.state_dict()) == names  # checkpoints keep their keys
    plain = family(MLP([16]), ADAM, latent_dim=2)
    plain.configure_model()
    assert all(net._compiled_call_impl is None for net in plain.children())


@pytest.mark.slow
def test_a_compiled_vae_computes_what_the_plain_one_does():
    torch.manual_seed(0)
    plain = VAE(MLP([32]), ADAM, latent_dim=2)
    compiled = VAE(MLP([32]), ADAM, latent_dim=2, compile=True)
    compiled.load_state_dict(plain.state_dict())
    compiled.configure_model()
    x = torch.rand(8, 1, 28, 28).round()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("net", [MLP([16, 8], norm="batch"), Conv([4, 8], norm="batch")])
def test_batch_norm_goes_into_decoders_only(net):
    def norms(module):
        return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    assert not norms(net.encoder(4))
    # One after each hidden layer of the decoder.
    assert len(norms(net.decoder(4))) == len(net.hidden_dims)


def test_kl_warmup_ramps_linearly_to_beta():
    vae = VAE(MLP([16]), ADAM, latent_dim=2, beta=2.0, kl_warmup_epochs=4)
    assert vae.kl_weight(0.0) == 0.0
    assert vae.kl_weight(0.5) == pytest.approx(2.0 * 0.5 / 4)
    assert vae.kl_weight(4.0) == vae.kl_weight(9.0) == 2.0
    assert VAE(MLP([16]), ADAM, latent_dim=2, beta=2.0).kl_weight(0.0) == 2.0


@pytest.mark.parametrize(
    ("build", "option"),
    [
        (lambda: MLP([64], activation="sigmoidish"), "model.net.activation"),
        (lambda: Conv([]), "model.net.hidden_dims"),
        (lambda: MLP([64], norm="layer"), "model.net.norm"),
        (lambda: VAE(MLP([8]), ADAM, recon_loss="l1"), "model.recon_loss"),
        (lambda: AE(MLP([8]), ADAM, recon_loss="l1"), "model.recon_loss"),
        (lambda: DCGAN([8, 16, 32]), "model.net.hidden_dims"),
        (lambda: VAE(MLP([8]), ADAM, iw_samples=0), "model.iw_samples"),
    ],
)
def test_bad_model_options_name_the_option(build, option):
    with pytest.raises(GenlabError, match=option):
        build()


def test_dcgan_nets_follow_radford_et_al():
    torch.manual_seed(0)
    net = DCGAN([32, 64])
    generator, discriminator = net.decoder(100), net.encoder(1)
    # Batch norm in every hidden layer of the generator, and in the discriminator's but its first.
    layers = [type(m).__name__ for m in discriminator]
    assert layers[:2] == ["Conv2d", "LeakyReLU"] and "BatchNorm2d" in layers[2:]
    assert sum(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in generator) == 2
    assert all(not isinstance(m, nn.LeakyReLU) for m in generator)
    # Weights from N(0, 0.02), batch-norm scales from N(1, 0.02).
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert convs[1].weight.std().item() == pytest.approx(0.02, rel=0.05)
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms[0].weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert DCGAN([8, 16], norm="none").encoder(1)[2].bias is not None


@pytest.mark.parametrize("logit", [-40.0, -6.0, -0.5, -0.1, -1e-3, 0.0, 0.05, 0.0999, 0.1, 3.0])
def test_the_continuous_bernoulli_is_a_density_on_grey_levels_with_the_mean_we_show(logit):
    x = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    logits = torch.full((x.numel(), 1, 1, 1), logit, dtype=torch.float64)
    density = torch.exp(-reconstruction_nll(logits, x.view(-1, 1, 1, 1), "cbernoulli"))
    assert torch.trapezoid(density, x).item() == pytest.approx(1.0, abs=1e-6)
    mean = torch.trapezoid(density * x, x).item()
    assert pixel_mean(logits[:1], "cbernoulli").item() == pytest.approx(mean, abs=1e-6)


def test_the_continuous_bernoulli_agrees_with_torch_and_is_smooth_at_one_half():
    torch.manual_seed(0)
    logits, x = torch.randn(3, 1, 28, 28) * 3, torch.rand(3, 1, 28, 28)
    # In float64, so that the comparison is not one of float32 summation orders.
    reference = -ContinuousBernoulli(logits=logits.double()).log_prob(x.double()).flatten(1)
    ours = reconstruction_nll(logits.double(), x.double(), "cbernoulli")
    torch.testing.assert_close(ours, reference.sum(1))
    # Either side of the switch to the Taylor series, and at logit 0 itself (0 / 0 in the
    # closed form), values join up and gradients are finite.
    near = torch.tensor([-0.1, -0.0999999, -1e-7, 0.0, 1e-7, 0.0999999, 0.1], requires_grad=True)
    values = cb_log_normalizer(near)
    assert values[0].item() == pytest.approx(values[1].item(), abs=1e-6)
    assert values[5].item() == pytest.approx(values[6].item(), abs=1e-6)
    assert values[2:5].tolist() == pytest.approx([math.log(2.0)] * 3)
    (grad,) = torch.autograd.grad(values.sum() + pixel_mean(near, "cbernoulli").sum(), near)
    assert torch.isfinite(grad).all()
    assert pixel_mean(torch.tensor(0.0), "cbernoulli").item() == 0.5


def test_one_importance_sample_is_exactly_the_vae():
    x = torch.rand(8, 1, 28, 28).round()
    torch.manual_seed(0)
    vae = VAE(MLP([32]), ADAM, latent_dim=4, beta=2.0, iw_samples=1)
    torch.manual_seed(1)
    metrics = vae.step((x, torch.zeros(8)), 0, "train")
    # The loss as the classic VAE writes it, with the same noise.
    torch.manual_seed(1)
    eps = torch.randn(8, 4)
    mu, logvar = vae.encode(x)
    logits = vae.decoder(mu + torch.exp(0.5 * logvar) * eps)
    recon = -Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1).mean()
    kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(metrics["loss"], recon + 2.0 * kl)
    torch.testing.assert_close(metrics["neg_elbo"], recon + kl)
    assert "neg_iw_bound" not in metrics and "neg_iw_bound" not in vae.metric_names


def test_the_importance_weighted_bound_is_the_one_evaluation_estimates_and_is_tighter():
    torch.manual_seed(0)
    vae = VAE(MLP([32]), ADAM, latent_dim=4, iw_samples=5)
    assert vae.metric_names[-1] == "neg_iw_bound"
    x = torch.rand(16, 1, 28, 28).round()
    metrics = vae.step((x, torch.zeros(16)), 0, "train")
    torch.testing.assert_close(metrics["loss"], metrics["neg_iw_bound"])  # beta = 1: IWAE itself
    metrics["loss"].backward()
    assert all(p.grad is not None for p in vae.parameters())

    # The training objective on given noise equals evaluation's estimate from the same noise.
    eps = torch.randn(16, 5, 4, generator=torch.Generator().manual_seed(3))
    recon, log_prior_ratio, _ = vae.iw_terms(x, eps)
    trained = math.log(5) - torch.logsumexp(log_prior_ratio - recon, 1)
    with torch.no_grad():
        weights = vae.log_importance_weights(x, 5, torch.Generator().manual_seed(3))
    estimated = math.log(5) - torch.logsumexp(weights, 1)
    torch.testing.assert_close(trained, estimated, rtol=1e-4, atol=1e-3)
    # Jensen: -log mean(w) <= mean(-log w), the one-sample -ELBO on the same codes.
    assert (trained <= (recon - log_prior_ratio).mean(1) + 1e-4).all()


def test_no_checkpoint_is_built_from_weights_that_are_not_finite():
    vae = VAE(MLP([8]), ADAM, latent_dim=2)
    with torch.no_grad():
        vae.decoder[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="decoder.0.weight"):
        vae.on_save_checkpoint({})


def test_a_gans_averaged_generator_follows_the_generator_and_draws_the_samples():
    torch.manual_seed(0)
    gan = GAN(DCGAN([8, 16]), ADAM, latent_dim=5, ema_decay=0.9)
    before = [p.clone() for p in gan.generator_ema.parameters()]
    with torch.no_grad():
        for p in gan.generator.parameters():
            p.add_(1.0)
    gan.update_ema()
    for old, new, live in zip(before, gan.generator_ema.parameters(), gan.generator.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * live)
    assert not any(p.requires_grad for p in gan.generator_ema.parameters())
    z = torch.randn(4, 5)
    gan.eval()
    torch.testing.assert_close(gan.decode(z), torch.sigmoid(gan.generator_ema(z)))
    assert not torch.allclose(gan.decode(z), torch.sigmoid(gan.generator(z)))
    # Without it, the generator itself.
    plain = GAN(DCGAN([8, 16]), ADAM, latent_dim=5).eval()
    assert plain.generator_ema is None
    torch.testing.assert_close(plain.decode(z), torch.sigmoid(plain.generator(z)))
