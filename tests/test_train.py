"""Training runs composed in process, as `genlab-train` runs them: files, metrics, checkpoints, resume."""

from __future__ import annotations

import csv
import json
import math

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from genlab.checkpoints import load_model
from genlab.errors import GenlabError
from genlab.train import train

TEST_METRICS = {
    "vae": {"test/loss", "test/neg_elbo", "test/recon", "test/kl"},
    "ae": {"test/loss", "test/recon"},
    "gan": {"test/d_loss", "test/g_loss", "test/d_real", "test/d_fake"},
}


def csv_rows(run_dir) -> list[dict[str, str]]:
    """The rows that logger=csv wrote for a run."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize("data", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("model", ["vae", "ae", "gan"])
def test_every_family_trains_on_every_data_set_and_net(make_cfg, tmp_path, model, data, net):
    metrics = train(make_cfg(f"model={model}", f"data={data}", f"model/net={net}"))

    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert TEST_METRICS[model] <= metrics.keys()
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in TEST_METRICS[model])
    assert metrics["status"] == "completed" and metrics["epochs"] == 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    best = list((run_dir / "checkpoints").glob("best-*.ckpt"))
    # AE and VAE keep the best checkpoint by val/loss and are tested on it; a GAN has no val/loss.
    assert len(best) == (0 if model == "gan" else 1)


def test_vae_loss_falls_over_100_steps_on_real_mnist(make_cfg):
    cfg = make_cfg(
        "model=vae", "++trainer.limit_train_batches=100", "++trainer.limit_val_batches=2"
    )
    pl.seed_everything(cfg.seed)
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=100,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (before,) = trainer.validate(model, datamodule=datamodule, verbose=False)
    trainer.fit(model, datamodule=datamodule)
    (after,) = trainer.validate(model, datamodule=datamodule, verbose=False)
    # An untrained Bernoulli decoder scores ~784 * log 2 = 543 nats; 100 Adam steps get well below 200.
    assert before["val/neg_elbo"] > 400
    assert after["val/neg_elbo"] < 200
    assert after["val/loss"] < 0.5 * before["val/loss"]


def test_metrics_json_reports_the_tested_checkpoint(make_cfg, tmp_path):
    metrics = train(make_cfg("model=vae", "model.beta=2"))
    assert metrics["test/loss"] == pytest.approx(metrics["test/recon"] + 2 * metrics["test/kl"])
    assert metrics["test/neg_elbo"] == pytest.approx(metrics["test/recon"] + metrics["test/kl"])
    assert metrics["tested_checkpoint"].startswith("checkpoints/best-")
    assert metrics["global_step"] == 3 and metrics["wall_time_s"] > 0
    # val/loss is the score that selected the tested checkpoint, as the checkpoint records it.
    best = torch.load(tmp_path / "run" / metrics["tested_checkpoint"], weights_only=True)
    (score,) = [
        s["best_model_score"] for s in best["callbacks"].values() if "best_model_score" in s
    ]
    assert metrics["val/loss"] == pytest.approx(float(score))


def test_without_the_ranking_checkpoint_the_final_weights_are_tested(make_cfg, tmp_path):
    metrics = train(make_cfg("callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null"))
    assert metrics["status"] == "completed"
    assert metrics["tested_checkpoint"] == "final weights"
    assert math.isfinite(metrics["test/neg_elbo"]) and math.isfinite(metrics["val/loss"])


def test_a_checkpoint_alone_rebuilds_the_model_and_its_test_metrics(make_cfg, tmp_path):
    cfg = make_cfg("model=vae", "model.latent_dim=3", "model/net=conv")
    metrics = train(cfg)
    model = load_model(tmp_path / "run" / metrics["tested_checkpoint"])
    assert model.latent_dim == 3 and not model.training

    trainer = pl.Trainer(
        accelerator="cpu", limit_test_batches=1, logger=False, enable_progress_bar=False
    )
    (again,) = trainer.test(model, datamodule=instantiate(cfg.data), verbose=False)
    for key in TEST_METRICS["vae"]:
        assert again[key] == pytest.approx(metrics[key], rel=1e-6)


def test_resume_last_continues_at_the_next_epoch(make_cfg, tmp_path):
    first = train(make_cfg("model=ae"))
    assert first["epochs"] == 1 and first["global_step"] == 3

    resumed = train(make_cfg("model=ae", "trainer.max_epochs=3", "resume=last"))
    assert resumed["epochs"] == 3 and resumed["global_step"] == 9
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 9
    # One TensorBoard history, not a version_N folder per attempt.
    assert not list((tmp_path / "run" / "tensorboard").glob("version_*"))


def test_resume_refuses_a_checkpoint_of_another_experiment(make_cfg, tmp_path):
    train(make_cfg("model=vae", "model.beta=4"))
    with pytest.raises(GenlabError, match=r"model\.beta was 4, now 1\.0"):
        train(make_cfg("model=vae", "trainer.max_epochs=2", "resume=last"))


def test_resume_last_without_a_checkpoint_is_a_clear_error(make_cfg, tmp_path):
    with pytest.raises(GenlabError, match="resume=last found no checkpoint"):
        train(make_cfg("resume=last"))


def test_a_fresh_run_never_overwrites_an_earlier_runs_checkpoints(make_cfg, tmp_path):
    train(make_cfg("model=ae"))
    before = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(GenlabError, match="resume=last"):
        train(make_cfg("model=ae"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes() == before


def test_gan_trains_both_players(make_cfg, tmp_path):
    metrics = train(make_cfg("model=gan", "logger=csv", "++trainer.limit_train_batches=30"))
    # Two optimiser steps per batch.
    assert metrics["global_step"] == 60
    rows = csv_rows(tmp_path / "run")
    (epoch,) = [r for r in rows if r.get("train/d_loss")]
    assert float(epoch["train/g_loss"]) > 0 and 0 < float(epoch["train/d_fake"]) < 1
    # After 30 steps the discriminator already tells held-out digits from samples.
    assert metrics["test/d_real"] > metrics["test/d_fake"]
    assert metrics["test/d_loss"] < 2 * math.log(2)  # below chance: log 4 nats


def _sample_spreads(make_cfg, tmp_path) -> tuple[float, float]:
    """Mean pairwise distance of 64 samples of the trained GAN under tmp_path/run, and of 64
    real test digits: a collapsed generator's samples lie near 0 apart."""
    gan = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt").eval()
    samples = gan.sample(64, torch.Generator().manual_seed(0)).flatten(1)
    digits = instantiate(make_cfg().data)
    digits.setup("test")
    real = next(iter(digits.test_dataloader()))[0][:64].flatten(1)
    mean_distance = lambda x: float(torch.cdist(x, x).sum() / (64 * 63))
    return mean_distance(samples), mean_distance(real)


def test_the_default_gans_samples_stay_apart(make_cfg, tmp_path, data_dir):
    # Without batch norm in the generator, 50 steps already pull every sample
    # towards one image (mean distance 0.8 here, and falling); with it, 2.7.
    train(make_cfg("model=gan", "++trainer.limit_train_batches=50", "callbacks.images=null"))
    samples, real = _sample_spreads(make_cfg, tmp_path)
    assert samples > 0.15 * real  # real digits: 9.8


def test_the_dcgan_separates_real_from_fake_without_collapsing(make_cfg, tmp_path):
    metrics = train(
        make_cfg(
            "model=gan",
            "model/net=dcgan",
            "model.net.hidden_dims=[16,32]",
            "model.ema_decay=0.9",  # samples from the averaged generator, saved and loaded with it
            "++trainer.limit_train_batches=100",
            "callbacks.images=null",
        )
    )
    assert metrics["test/d_real"] > 0.5 > metrics["test/d_fake"]
    assert metrics["test/d_loss"] < 2 * math.log(2)
    samples, real = _sample_spreads(make_cfg, tmp_path)
    # A collapsed generator draws one image whatever its noise (distance near 0); after
    # 100 steps this one's samples lie 3.4 apart, real digits 9.8.
    assert samples > 0.25 * real


def test_an_iwae_logs_its_bound_beside_the_elbo(make_cfg, tmp_path):
    metrics = train(
        make_cfg(
            "model=vae", "model.iw_samples=5", "logger=csv", "++trainer.limit_train_batches=30"
        )
    )
    (epoch,) = [r for r in csv_rows(tmp_path / "run") if r.get("train/neg_iw_bound")]
    assert float(epoch["train/neg_elbo"]) > float(epoch["train/neg_iw_bound"]) > 0
    # Five codes per image give a tighter bound than one, and it is what was optimised.
    assert metrics["test/neg_iw_bound"] < metrics["test/neg_elbo"]
    assert metrics["test/loss"] == metrics["test/neg_iw_bound"]


def test_a_continuous_bernoulli_vae_learns_a_density_of_grey_levels(make_cfg, tmp_path):
    cfg = make_cfg(
        "model=vae",
        "model.recon_loss=cbernoulli",
        "data.binarize=none",
        "logger=csv",
        "++trainer.limit_train_batches=40",
        "trainer.log_every_n_steps=5",
    )
    metrics = train(cfg)
    steps = [
        float(r["train/loss_step"]) for r in csv_rows(tmp_path / "run") if r.get("train/loss_step")
    ]
    assert steps[-1] < steps[0] - 500  # nats: a density of grey levels goes far below zero
    assert metrics["test/neg_elbo"] < 0


@pytest.mark.parametrize(("model", "lr", "optimizers"), [("vae", 1e-3, 1), ("gan", 2e-4, 2)])
def test_a_scheduler_sets_each_epochs_learning_rate(make_cfg, tmp_path, model, lr, optimizers):
    halving = "{_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:1,gamma:0.5}"
    train(make_cfg(f"model={model}", f"model.scheduler={halving}", "trainer.max_epochs=2"))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    rates = [g["lr"] for s in checkpoint["optimizer_states"] for g in s["param_groups"]]
    # Halved after each of the two epochs.
    assert rates == pytest.approx([lr / 4] * optimizers)
    assert len(checkpoint["lr_schedulers"]) == optimizers


def test_a_scheduler_missing_an_argument_is_a_config_error(make_cfg):
    cosine = "{_target_:torch.optim.lr_scheduler.CosineAnnealingLR,_partial_:true}"
    with pytest.raises(GenlabError, match=r"model.scheduler \(CosineAnnealingLR\).*T_max"):
        train(make_cfg(f"model.scheduler={cosine}"))


def test_kl_warmup_ramps_the_training_objective(make_cfg, tmp_path):
    train(
        make_cfg(
            "model.beta=2", "model.kl_warmup_epochs=2", "logger=csv", "trainer.log_every_n_steps=1"
        )
    )
    rows = csv_rows(tmp_path / "run")
    weights = [float(r["train/kl_weight_step"]) for r in rows if r.get("train/kl_weight_step")]
    # Three batches of the first of two warm-up epochs: beta * (0, 1/3, 2/3) / 2.
    assert weights == pytest.approx([0.0, 1 / 3, 2 / 3])
    losses = [r for r in rows if r.get("train/loss_step")]
    for row, weight in zip(losses, weights):
        expected = float(row["train/recon_step"]) + weight * float(row["train/kl_step"])
        assert float(row["train/loss_step"]) == pytest.approx(expected, rel=1e-4)


def test_training_logs_step_values_and_their_epoch_mean(make_cfg, tmp_path):
    train(make_cfg("model=vae", "logger=csv", "trainer.log_every_n_steps=1"))
    rows = csv_rows(tmp_path / "run")
    steps = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    (epoch,) = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(steps) == 3  # every step (log_every_n_steps=1), all batches of 128
    assert epoch == pytest.approx(sum(steps) / 3, rel=1e-5)
    assert any(r.get("val/loss") for r in rows) and any(r.get("test/loss") for r in rows)


def test_a_profiler_named_in_the_config_profiles_the_run(make_cfg, tmp_path):
    # genlab swaps Lightning's default do-nothing profiler for a cheaper one; a real one still wins.
    profiler = [
        "++trainer.profiler._target_=pytorch_lightning.profilers.SimpleProfiler",
        f"++trainer.profiler.dirpath={tmp_path}",
        "++trainer.profiler.filename=profile",
    ]
    train(make_cfg("model=ae", *profiler))
    report = (tmp_path / "fit-profile.txt").read_text()
    assert "run_training_batch" in report and "[LightningModule]AE.optimizer_step" in report


@pytest.mark.parametrize("clip", [None, 0.5])
def test_gradients_are_clipped_at_every_step_only_when_asked(make_cfg, monkeypatch, clip):
    norms = []
    clip_grad_norm = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return clip_grad_norm(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    train(make_cfg("model=vae", f"trainer.gradient_clip_val={'null' if clip is None else clip}"))
    assert norms == ([] if clip is None else [clip] * 3)  # 3 training steps
