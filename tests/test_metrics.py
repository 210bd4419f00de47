"""Evaluation metrics against closed forms, their definitions and known answers."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch.distributions import Bernoulli, MultivariateNormal, Normal

from genlab import metrics
from genlab.checkpoints import load_model
from genlab.data import binarize_sample
from genlab.models import VAE
from genlab.models.nets import MLP

ADAM = partial(torch.optim.Adam, lr=1e-3)


class LinearGaussian:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I), so p(x) = N(b, W W^T + s^2 I) exactly.

    Its proposal q(z|x) is the exact posterior with the standard deviation
    inflated 1.5 times, so that importance sampling has work to do.
    """

    def __init__(self, latent_dim: int = 2, dim: int = 6, noise: float = 0.5):
        generator = torch.Generator().manual_seed(0)
        self.w = torch.randn(dim, latent_dim, generator=generator, dtype=torch.float64)
        self.b = torch.randn(dim, generator=generator, dtype=torch.float64)
        self.noise = noise
        precision = torch.eye(latent_dim, dtype=torch.float64) + self.w.T @ self.w / noise**2
        self.posterior_cov = torch.linalg.inv(precision)
        self.proposal_chol = 1.5 * torch.linalg.cholesky(self.posterior_cov)

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.w @ self.w.T + self.noise**2 * torch.eye(len(self.b), dtype=torch.float64)
        return MultivariateNormal(self.b, cov).log_prob(x)

    def sample(self, n: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        z = torch.randn(n, self.w.size(1), generator=generator, dtype=torch.float64)
        noise = torch.randn(n, len(self.b), generator=generator, dtype=torch.float64)
        return z @ self.w.T + self.b + self.noise * noise

    def log_importance_weights(self, x, k, generator):
        mean = (x - self.b) @ self.w @ self.posterior_cov / self.noise**2
        eps = torch.randn(x.size(0), k, self.w.size(1), generator=generator, dtype=torch.float64)
        z = mean.unsqueeze(1) + eps @ self.proposal_chol.T
        log_px_given_z = Normal(z @ self.w.T + self.b, self.noise).log_prob(x.unsqueeze(1)).sum(-1)
        log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
        # log q(z|x) with z = mean + L eps: a standard normal in eps, over |det L|.
        log_qz = Normal(0.0, 1.0).log_prob(eps).sum(-1) - self.proposal_chol.diag().log().sum()
        return log_px_given_z + log_pz - log_qz


def test_importance_sampled_nll_converges_to_the_closed_form_likelihood():
    model = LinearGaussian()
    x = model.sample(100)
    exact = -model.log_likelihood(x).mean().item()
    errors = {}
    for k in (1, 10, 100, 2000):
        # batch_size 256 < k = 2000: the samples of one image come in chunks, joined by logsumexp.
        nll = metrics.importance_sampled_nll(
            model, x, k, batch_size=256, generator=torch.Generator().manual_seed(k)
        )
        errors[k] = nll.mean().item() - exact
    # An upper bound on -log p(x) in expectation (up to Monte Carlo noise of ~0.01 nats
    # here), which tightens towards it as K grows.
    assert min(errors.values()) > -0.02, errors
    assert errors[1] > 0.1 and errors[1] > errors[10] > abs(errors[2000]), errors
    assert abs(errors[2000]) < 0.01, errors


@pytest.mark.parametrize("recon_loss", ["bce", "mse"])
def test_vae_importance_weights_match_their_definition(recon_loss):
    torch.manual_seed(0)
    vae = VAE(MLP([32]), ADAM, latent_dim=3, recon_loss=recon_loss)
    x = torch.rand(4, 1, 28, 28).round()
    with torch.no_grad():
        log_w = vae.log_importance_weights(x, 5, torch.Generator().manual_seed(1))

        eps = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))
        mu, logvar = vae.encode(x)
        q = Normal(mu.unsqueeze(1), torch.exp(0.5 * logvar).unsqueeze(1))
        z = q.loc + q.scale * eps
        logits = vae.decoder(z.flatten(0, 1)).unflatten(0, (4, 5))
        if recon_loss == "bce":
            p_x = Bernoulli(logits=logits)
        else:
            p_x = Normal(torch.sigmoid(logits), math.sqrt(0.5))
        log_px = p_x.log_prob(x.unsqueeze(1)).flatten(2).sum(-1)
        expected = log_px + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
    torch.testing.assert_close(log_w, expected, rtol=1e-5, atol=1e-3)


def test_nll_is_below_the_neg_elbo_and_equals_it_in_expectation_at_k1(vae_checkpoint, mnist_full):
    vae = load_model(vae_checkpoint)
    x = binarize_sample(mnist_full.splits["test"][0][:500], seed=0)
    recon, kl = metrics.elbo_terms(vae, x, 256, torch.Generator().manual_seed(0))
    neg_elbo = recon + kl.sum(1)

    def nll(k: int) -> torch.Tensor:
        return metrics.importance_sampled_nll(vae, x, k, 4096, torch.Generator().manual_seed(k))

    # Paired per image, so that the spread between images cancels; the Monte Carlo noise is left.
    at_k1 = nll(1) - neg_elbo
    assert abs(at_k1.mean()) < 4 * at_k1.std() / math.sqrt(len(x))
    gain = neg_elbo - nll(200)
    assert gain.mean() > 4 * gain.std() / math.sqrt(len(x))
    assert gain.mean() < 20  # a few nats, not a broken estimate


def test_bits_per_dim_is_nats_per_pixel_in_base_2():
    assert metrics.bits_per_dim(784 * math.log(2)) == pytest.approx(1.0)
    assert metrics.bits_per_dim(100.0, dims=10) == pytest.approx(10 / math.log(2))


def test_active_units_count_dims_whose_means_vary_with_the_input():
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(1000, 5, generator=generator) * torch.tensor([1.0, 0.5, 0.2, 0.01, 0.0])
    # Variances 1, 0.25, 0.04 are active; 1e-4 and 0 are not.
    assert metrics.active_units(means) == 3


def _clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 6, generator=torch.Generator().manual_seed(99)) * 5
    labels = torch.randint(0, 4, (n,), generator=generator)
    return centres[labels] + torch.randn(n, 6, generator=generator), labels


def test_probes_read_labels_off_separable_codes_and_not_off_noise():
    train_codes, train_labels = _clusters(2000, seed=1)
    test_codes, test_labels = _clusters(500, seed=2)
    args = (train_codes, train_labels, test_codes, test_labels)
    assert metrics.linear_probe_accuracy(*args) > 0.97
    assert metrics.knn_accuracy(*args, k=5, batch_size=128) > 0.97

    shuffled = train_labels[torch.randperm(len(train_labels))]
    args = (train_codes, shuffled, test_codes, test_labels)
    assert metrics.linear_probe_accuracy(*args) < 0.4  # chance: 0.25
    assert metrics.knn_accuracy(*args, k=5) < 0.4
