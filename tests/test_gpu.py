"""genlab on a CUDA GPU: each family trains there as on the CPU, resume is exact, the
likelihood agrees, and a steady-state training step never waits for the device.

Marked ``gpu``: they run where CUDA is present (``pytest -m gpu``, or as part of the
suite) and are skipped, with the reason, elsewhere. ``scripts/gpu_check.sh`` runs them
on a new GPU machine.
"""

from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch

from commands import run_commands
from conftest import FAST_EVAL
from genlab.config import compose_config
from genlab.evaluate import evaluate
from genlab.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Long enough for the losses to move well away from their start.
STEPS = ("++trainer.limit_train_batches=30", "++trainer.limit_val_batches=2")


def _losses(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(("test/", "val/"))}


@pytest.mark.parametrize("model", ["vae", "ae", "gan"])
def test_each_family_trains_on_the_gpu_as_on_the_cpu(make_cfg, tmp_path, model):
    on_gpu = train(make_cfg(f"model={model}", "trainer=gpu", *STEPS, run_dir=tmp_path / "gpu"))
    on_cpu = train(make_cfg(f"model={model}", "trainer=cpu", *STEPS, run_dir=tmp_path / "cpu"))
    assert on_gpu["status"] == "completed"
    gpu, cpu = _losses(on_gpu), _losses(on_cpu)
    assert gpu.keys() == cpu.keys() and gpu
    # The same seed and data order, but the devices draw different noise from it (and
    # round differently): the losses agree as two draws of one training run do. A GAN's
    # game amplifies differences most, so only its losses are compared.
    names = ["val/d_loss", "val/g_loss", "test/d_loss", "test/g_loss"] if model == "gan" else gpu
    for name in names:
        tolerance = 0.5 if model == "gan" else 0.05
        assert gpu[name] == pytest.approx(cpu[name], rel=tolerance, abs=0.05), name


def test_bf16_mixed_and_compile_train_on_the_gpu(make_cfg, tmp_path):
    metrics = train(
        make_cfg(
            "model=vae", "trainer=gpu", "trainer.precision=bf16-mixed", "model.compile=true", *STEPS
        )
    )
    assert metrics["status"] == "completed" and math.isfinite(metrics["test/neg_elbo"])


def test_a_resumed_gpu_run_ends_exactly_as_an_uninterrupted_one(make_cfg, tmp_path):
    settings = ("model=vae", "trainer=gpu", "trainer.deterministic=true", "logger=csv", *STEPS)
    straight = train(make_cfg(*settings, "trainer.max_epochs=2", run_dir=tmp_path / "straight"))
    train(make_cfg(*settings, "trainer.max_epochs=1", run_dir=tmp_path / "resumed"))
    resumed = train(
        make_cfg(*settings, "trainer.max_epochs=2", "resume=last", run_dir=tmp_path / "resumed")
    )
    assert _losses(resumed) == _losses(straight)


def test_the_likelihood_on_the_gpu_agrees_with_the_cpu(vae_checkpoint, cache_dir, tmp_path):
    results = {}
    for device in ("cuda", "cpu"):
        cfg = compose_config(
            [
                *FAST_EVAL,
                f"ckpt_path={vae_checkpoint}",
                f"paths.output_dir={tmp_path / device}",
                f"paths.cache_dir={cache_dir}",
                f"eval.device={device}",
                "eval.nll_samples=1000",
            ],
            config_name="eval",
        )
        results[device] = evaluate(cfg)
    # Different noise on each device: they agree within Monte-Carlo error (about 0.1 nats).
    assert results["cuda"]["test/nll"] == pytest.approx(results["cpu"]["test/nll"], abs=1.0)
    assert results["cuda"]["test/fid"] == pytest.approx(results["cpu"]["test/fid"], rel=0.2)


class NoSyncInSteps(pl.Callback):
    """Makes any host-device synchronisation an error in training steps 3 to 6 (steady
    state: neither a logging step nor the epoch's last); counts the steps it watched."""

    checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if 3 <= batch_idx <= 6:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 3 <= batch_idx <= 6:
            torch.cuda.set_sync_debug_mode("default")
            NoSyncInSteps.checked += 1


@pytest.mark.parametrize("model", ["vae", "gan"])
def test_a_steady_state_training_step_never_waits_for_the_gpu(make_cfg, tmp_path, model):
    NoSyncInSteps.checked = 0
    cfg = make_cfg(
        f"model={model}",
        "trainer=gpu",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=50",
        "++trainer.limit_train_batches=10",
        "+callbacks.no_sync._target_=test_gpu.NoSyncInSteps",
    )
    try:
        metrics = train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert metrics["status"] == "completed" and NoSyncInSteps.checked == 4


def test_a_fused_sweep_trains_on_the_gpu_as_the_basic_launcher(data_dir, tmp_path):
    """The same jobs, fused on the GPU and one by one on the GPU: the same numbers, to the
    GPU's float tolerance (the stacked matrix products sum in another order)."""
    grid = ["-m", "model.latent_dim=2,4", "model.beta=0.5,2", "trainer=gpu", *STEPS]
    grid += ["trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
    fused, basic = run_commands(
        "genlab-train",
        [
            {"args": [*grid, "hydra/launcher=fused", f"hydra.sweep.dir={tmp_path / 'fused'}"]},
            {"args": [*grid, f"hydra.sweep.dir={tmp_path / 'basic'}"]},
        ],
        data_dir,
        tmp_path,
    )
    assert fused["code"] == 0 and basic["code"] == 0, fused["stderr"][-3000:]
    assert "Fused: jobs 0, 1, 2, 3 train as one model" in fused["stdout"] + fused["stderr"]
    for job in "0123":
        together = json.loads((tmp_path / "fused" / job / "metrics.json").read_text())
        alone = json.loads((tmp_path / "basic" / job / "metrics.json").read_text())
        for name, value in _losses(alone).items():
            assert together[name] == pytest.approx(value, rel=1e-3), (job, name)
