"""Fused sweeps (hydra/launcher=fused): stacked members train exactly as their standalone
runs, and every job still writes a complete run folder."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from commands import command_env, run_commands
from genlab.checkpoints import load_model, read_checkpoint
from genlab.config import compose_config
from genlab.fused.launch import program_key, unfusable
from genlab.fused.model import FusedModel

TINY = [
    "trainer.max_epochs=2",
    "++trainer.limit_train_batches=4",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "data.eval_batch_size=500",
    "callbacks.images.latent_points=300",
    "callbacks.images.projector_points=0",
]
GRID = ["model.latent_dim=2,4", "model.beta=0.5,2"]
FUSED = "hydra/launcher=fused"

# Run first in the interpreter of the commands below: a member made to diverge, a stop
# mid-epoch, or the training sums kept on the device as on a GPU (read only when needed),
# where the test's environment asks for one.
PRELUDE = """
import os, signal
import torch
from genlab.fused import model as fused_model
_metrics, _step = fused_model.FusedModel._metrics, fused_model.FusedModel.training_step
def _nan_in_member_1(self, *args):
    values = _metrics(self, *args)
    if os.environ.get("TEST_NAN") and torch.is_grad_enabled() and self.current_epoch == 1:
        values = values + torch.tensor([0.0, float("nan")]).view(-1, 1)[: values.size(0)]
    return values
_validate = fused_model.FusedModel.validation_step
def _stop_in_sanity_check(self, batch, batch_idx):
    if os.environ.get("TEST_STOP_SANITY") and self.trainer.sanity_checking:
        os.kill(os.getpid(), signal.SIGTERM)
    return _validate(self, batch, batch_idx)
def _stop_mid_epoch(self, batch, batch_idx):
    stop = os.environ.get("TEST_STOP")
    if stop and self.current_epoch == 1 and batch_idx == 2 and not getattr(self, "_stopped", 0):
        self._stopped = 1
        os.kill(os.getpid(), getattr(signal, stop))
    return _step(self, batch, batch_idx)
_on_device = fused_model.FusedModel._sums_on_device
def _sums_on_device(self):
    return bool(os.environ.get("TEST_DEVICE_SUMS")) or _on_device(self)
fused_model.FusedModel._metrics = _nan_in_member_1
fused_model.FusedModel.training_step = _stop_mid_epoch
fused_model.FusedModel._sums_on_device = _sums_on_device
fused_model.FusedModel.validation_step = _stop_in_sanity_check
"""


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _close(a: dict, b: dict, rel: float) -> list[str]:
    """The test/ and val/ numbers in which ``a`` and ``b`` differ by more than ``rel``."""
    keys = [k for k in a if k.startswith(("test/", "val/"))]
    assert keys and set(keys) == {k for k in b if k.startswith(("test/", "val/"))}
    return [f"{k}: {a[k]} vs {b[k]}" for k in keys if not math.isclose(a[k], b[k], rel_tol=rel)]


# -- the maths: unit tests ---------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "SGD"])
@pytest.mark.parametrize("fused", [False, True])
def test_one_optimiser_over_stacked_parameters_is_one_per_member(optimizer, fused):
    """Adam is elementwise: one Adam over the members' stacked parameters takes exactly the
    steps each member's own Adam takes (and so do AdamW and SGD with momentum)."""
    torch.manual_seed(0)
    options = {"lr": 0.01, "fused": fused}
    if optimizer == "SGD":
        options["momentum"] = 0.9
    build = getattr(torch.optim, optimizer)
    stacked = torch.nn.Parameter(torch.randn(3, 5, 4))
    alone = [torch.nn.Parameter(stacked[i].detach().clone()) for i in range(3)]
    together, apart = build([stacked], **options), [build([p], **options) for p in alone]
    for _ in range(6):
        grads = torch.randn(3, 5, 4) * torch.tensor([1e-3, 1.0, 1e3]).view(3, 1, 1)
        stacked.grad = grads.clone()
        together.step()
        for p, opt, g in zip(alone, apart, grads):
            p.grad = g.clone()
            opt.step()
    for i, p in enumerate(alone):
        torch.testing.assert_close(stacked[i], p, rtol=1e-6, atol=1e-7)


def _member(model: str, latent_dim: int, seed: int = 0):
    cfg = compose_config([f"model={model}", f"model.latent_dim={latent_dim}"])
    pl.seed_everything(seed, verbose=False)
    return instantiate(cfg.model)


@pytest.mark.parametrize("family", ["vae", "ae"])
def test_a_padded_member_trains_exactly_as_its_own_smaller_model(family, data_dir):
    """A 2-D member fused with a 5-D one: the same losses step by step and the same
    weights as the 2-D model trained alone, with its padded entries exactly zero."""
    small, big = _member(family, 2, seed=1), _member(family, 5, seed=2)
    alone = _member(family, 2, seed=1)
    fused = FusedModel([small, big], noise_seeds=[1, 2], data_orders=[0, 0])
    together = torch.optim.Adam(fused.parameters(), lr=1e-3)
    apart = torch.optim.Adam(alone.parameters(), lr=1e-3)
    cfg = compose_config([f"data.data_dir={data_dir}"])
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    images = datamodule.splits["train"][0]
    generator = torch.Generator().manual_seed(3)
    for step in range(5):
        x = images[step * 64 : (step + 1) * 64]
        eps = None
        if family == "vae":
            eps = torch.zeros(2, 64, 1, 5)
            eps[0, ..., :2] = torch.randn(64, 1, 2, generator=generator)
            eps[1] = torch.randn(64, 1, 5, generator=generator)
        values = fused._metrics(x, None, eps, torch.tensor([1.0, 1.0]))
        together.zero_grad()
        values[:, 0].sum().backward()
        together.step()
        loss = alone.loss_terms(x, None if eps is None else eps[0, ..., :2], 1.0)["loss"]
        apart.zero_grad()
        loss.backward()
        apart.step()
        torch.testing.assert_close(values[0, 0], loss, rtol=1e-5, atol=1e-4)
    # Summation order differs in the stacked matmuls: Adam, which divides each update by
    # the gradient's running size, turns that rounding into at most a fraction of one step
    # (lr = 1e-3) for the few weights whose gradients are nearly zero.
    for name, weight in fused.member_weights(0).items():
        own = dict(alone.named_parameters())[name]
        torch.testing.assert_close(weight, own, rtol=0, atol=1e-4)
    # Padded entries: never moved from zero.
    for name, stacked in zip(fused.names, fused.stacked):
        back = fused.layouts[0].pad(name, fused.member_weights(0)[name], stacked.shape[1:])
        assert torch.equal(stacked[0].detach(), back), name


def test_which_jobs_fuse_and_which_run_alone():
    def config(*overrides):
        from omegaconf import OmegaConf

        cfg = compose_config(["paths.output_dir=/tmp/job", *overrides])
        return OmegaConf.to_container(cfg, resolve=True)

    assert unfusable(config()) is None
    assert unfusable(config("model=ae", "model/net=conv")) is None
    assert "AE and VAE" in unfusable(config("model=gan"))
    assert "batch norm" in unfusable(config("model.net.norm=batch"))
    assert "gradient clipping" in unfusable(config("trainer.gradient_clip_val=1.0"))
    assert "model.compile" in unfusable(config("model.compile=true"))
    assert "one device" in unfusable(config("trainer=ddp"))
    # Members may differ in latent size, beta, warm-up and seed; not in width or lr.
    same = program_key(config("model.latent_dim=2", "model.beta=4", "seed=3"))
    assert same == program_key(config("model.latent_dim=8", "model.kl_warmup_epochs=2"))
    assert same != program_key(config("model.optimizer.lr=0.01"))
    assert same != program_key(config("model.net.hidden_dims=[64]"))


# -- sweeps, as a user runs them ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sweeps(data_dir, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The sweeps below, run one after another from one interpreter: their folder (a
    sweep's is ``<folder>/<name>``), and the result of each by name."""
    folder = tmp_path_factory.mktemp("fused")
    cases = {
        "fused": ([*GRID, FUSED, *TINY], {}),
        "basic": ([*GRID, *TINY], {}),
        "one member each": ([*GRID, FUSED, "hydra.launcher.max_members=1", *TINY], {}),
        "diverging": (["model.latent_dim=2,4", FUSED, *TINY], {"TEST_NAN": "1"}),
        "diverging-device-sums": (
            ["model.latent_dim=2,4", FUSED, *TINY],
            {"TEST_NAN": "1", "TEST_DEVICE_SUMS": "1"},
        ),
        "device-sums": ([*GRID, FUSED, *TINY], {"TEST_DEVICE_SUMS": "1"}),
        "sanity-stop": (["model.latent_dim=2,4", FUSED, *TINY], {"TEST_STOP_SANITY": "1"}),
        "validated-once": (
            ["model.latent_dim=2,4", FUSED, *TINY, "trainer.check_val_every_n_epoch=2"],
            {},
        ),
        "validated-once-basic": (
            ["model.latent_dim=2,4", *TINY, "trainer.check_val_every_n_epoch=2"],
            {},
        ),
        "stopped": (["model.latent_dim=2,4", FUSED, *TINY], {"TEST_STOP": "SIGTERM"}),
        "uninterrupted": (["model.latent_dim=2,4", FUSED, *TINY], {}),
        "no members": ([FUSED, "hydra.launcher.max_members=0", *TINY], {}),
        "seeds": (["seed=1,2", "model.latent_dim=2,3", FUSED, *TINY], {}),
        "seeds-basic": (["seed=1,2", "model.latent_dim=2,3", *TINY], {}),
    }
    runs = [
        {
            "args": ["-m", *args, f"hydra.sweep.dir={folder / name}"],
            "env": env,
            "read": str(folder / name / "0" / "metrics.json"),
        }
        for name, (args, env) in cases.items()
    ]
    again = {"stopped, again": "stopped", "sanity-stop, again": "sanity-stop"}
    for name in again.values():  # the stopped sweeps' commands again, at the end
        runs.append({**runs[list(cases).index(name)], "env": {}})
    results = run_commands("genlab-train", runs, data_dir, folder, prelude=PRELUDE)
    return folder, dict(zip([*cases, *again], results, strict=True))


def test_a_group_size_below_one_is_a_clear_error(sweeps):
    _, results = sweeps
    result = results["no members"]
    assert result["code"] == 1
    assert "hydra.launcher.max_members=0 must be a whole number of at least 1" in result["stderr"]
    assert "Traceback" not in result["stderr"]


def test_a_fused_sweep_writes_every_job_as_a_complete_run(sweeps, data_dir):
    folder, results = sweeps
    sweep, result = folder / "fused", results["fused"]
    assert result["code"] == 0, result["stderr"][-3000:]
    console = result["stdout"] + result["stderr"]
    assert "Fused: jobs 0, 1, 2, 3 train as one model" in console
    assert "Traceback" not in console
    basic = folder / "basic"
    for job in "0123":
        run = sweep / job
        metrics = _metrics(run)
        assert metrics["status"] == "completed"
        assert set(metrics) == set(_metrics(basic / job)) - {"wall_time_s"} | {"wall_time_s"}
        names = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
        standalone = {p.relative_to(basic / job).as_posix() for p in (basic / job).rglob("*")}
        # The same files, but for TensorBoard's event files (named by time and process).
        assert {n for n in names if "events.out" not in n} == {
            n for n in standalone if "events.out" not in n and (basic / job / n).is_file()
        }
        best = run / metrics["tested_checkpoint"]
        assert best.name == "best-epoch001.ckpt" or best.name == "best-epoch000.ckpt"
        model = load_model(best)
        assert model.hparams.latent_dim == (2 if job in "01" else 4)
        (label,) = [p.name for p in (run / "tensorboard").iterdir()]
        events = EventAccumulator(str(run / "tensorboard" / label))
        events.Reload()
        scalars = set(events.Tags()["scalars"])
        assert {"train/loss", "val/loss", "test/loss", "train/kl", "test/neg_elbo"} <= scalars
        assert {"recon", "samples", "latent"} <= set(events.Tags()["images"])
        assert len(events.Scalars("train/loss")) == 2  # one per epoch
    assert label == "latent_dim=4,beta=2"
    assert (sweep / "summary.md").is_file() and "completed" in (sweep / "summary.md").read_text()

    # genlab-eval accepts a member's best checkpoint.
    best = sweep / "3" / _metrics(sweep / "3")["tested_checkpoint"]
    (evaluated,) = run_commands(
        "genlab-eval",
        [
            {
                "args": [
                    f"ckpt_path={best}",
                    "eval.nll_samples=5",
                    "eval.test_examples=200",
                    "eval.fid=false",
                    f"hydra.run.dir={folder / 'eval'}",
                ]
            }
        ],
        data_dir,
        folder,
    )
    assert evaluated["code"] == 0, evaluated["stderr"][-3000:]
    assert json.loads((folder / "eval" / "metrics.json").read_text())["test/nll"] > 0


def test_fused_members_match_the_same_jobs_run_alone(sweeps):
    """Same init, data order and noise: each member's numbers are its standalone run's,
    to float tolerance; one member per group too."""
    folder, results = sweeps
    for name in ("fused", "basic", "one member each"):
        assert results[name]["code"] == 0, results[name]["stderr"][-3000:]
    for job in "0123":
        alone = _metrics(folder / "basic" / job)
        assert not _close(_metrics(folder / "fused" / job), alone, rel=1e-4)
        assert not _close(_metrics(folder / "one member each" / job), alone, rel=1e-5)
        assert _metrics(folder / "fused" / job)["tested_checkpoint"] == alone["tested_checkpoint"]


def test_members_with_their_own_seeds_see_their_own_data_order_and_noise(sweeps):
    folder, results = sweeps
    assert results["seeds"]["code"] == 0, results["seeds"]["stderr"][-3000:]
    assert "Fused: jobs 0, 1, 2, 3 train as one model" in results["seeds"]["stdout"]
    for job in "0123":
        alone = _metrics(folder / "seeds-basic" / job)
        assert not _close(_metrics(folder / "seeds" / job), alone, rel=1e-4)


def test_validation_every_other_epoch_is_logged_and_ranked_as_by_the_basic_launcher(sweeps):
    folder, results = sweeps
    assert results["validated-once"]["code"] == 0, results["validated-once"]["stderr"][-3000:]
    for job in "01":
        fused, basic = folder / "validated-once" / job, folder / "validated-once-basic" / job
        assert not _close(_metrics(fused), _metrics(basic), rel=1e-4)
        assert _metrics(fused)["tested_checkpoint"] == _metrics(basic)["tested_checkpoint"]
        (label,) = (fused / "tensorboard").iterdir()
        events = EventAccumulator(str(label))
        events.Reload()
        assert len(events.Scalars("val/loss")) == 1 and len(events.Scalars("train/loss")) == 2


def test_a_diverging_member_stops_alone_and_keeps_its_last_good_checkpoint(sweeps):
    folder, results = sweeps
    sweep, result = folder / "diverging", results["diverging"]
    assert result["code"] == 0, result["stderr"][-3000:]
    diverged, other = _metrics(sweep / "1"), _metrics(sweep / "0")
    assert diverged["status"] == "diverged"
    assert "train/loss=nan" in diverged["message"] and "at epoch 1, step 4" in diverged["message"]
    assert diverged["last_checkpoint"] == "checkpoints/last.ckpt"
    last = read_checkpoint(sweep / "1" / "checkpoints" / "last.ckpt", "test")
    assert last["epoch"] == 0  # saved at the end of epoch 0, before the NaN
    assert all(w.isfinite().all() for w in last["state_dict"].values())
    load_model(sweep / "1" / "checkpoints" / "last.ckpt")
    # The other member went on, exactly as without its diverging neighbour.
    assert other["status"] == "completed"
    assert not _close(other, _metrics(folder / "uninterrupted" / "0"), rel=1e-5)


def test_with_the_sums_on_the_device_a_diverged_member_is_found_by_the_epochs_end(sweeps):
    """As on a GPU, where the flags are read only on logged steps, at the epoch's end and
    before a checkpoint: the member is found at the end of the epoch it diverged in, and
    nothing is saved from after its NaN."""
    folder, results = sweeps
    sweep, result = folder / "diverging-device-sums", results["diverging-device-sums"]
    assert result["code"] == 0, result["stderr"][-3000:]
    diverged = _metrics(sweep / "1")
    assert diverged["status"] == "diverged"
    assert "train/loss" in diverged["message"]
    assert "became NaN or infinite in epoch 1, by step" in diverged["message"]
    last = read_checkpoint(sweep / "1" / "checkpoints" / "last.ckpt", "test")
    assert last["epoch"] == 0
    assert all(w.isfinite().all() for w in last["state_dict"].values())
    assert not _close(_metrics(sweep / "0"), _metrics(folder / "uninterrupted" / "0"), rel=1e-5)


def test_sums_kept_on_the_device_give_the_same_runs(sweeps):
    folder, results = sweeps
    assert results["device-sums"]["code"] == 0, results["device-sums"]["stderr"][-3000:]
    for job in "0123":
        assert not _close(
            _metrics(folder / "device-sums" / job), _metrics(folder / "fused" / job), 0
        )
        curves = []
        for name in ("fused", "device-sums"):
            (label,) = (folder / name / job / "tensorboard").iterdir()
            events = EventAccumulator(str(label))
            events.Reload()
            curves.append([e.value for e in events.Scalars("train/neg_elbo")])
        assert curves[0] == curves[1] and len(curves[0]) == 2


def test_a_fused_sweep_stopped_mid_epoch_continues_exactly(sweeps):
    folder, results = sweeps
    stopped, again = results["stopped"], results["stopped, again"]
    assert stopped["code"] == 128 + signal.SIGTERM, stopped["stderr"][-3000:]
    assert again["code"] == 0, again["stderr"][-3000:]
    assert "Job 0 stopped earlier: continuing it from its last.ckpt." in again["stdout"]
    for job in "01":
        resumed = _metrics(folder / "stopped" / job)
        assert resumed["status"] == "completed"
        assert not _close(resumed, _metrics(folder / "uninterrupted" / job), rel=1e-5)


def test_a_fused_sweep_stopped_in_its_sanity_check_continues_exactly(sweeps):
    folder, results = sweeps
    stopped, again = results["sanity-stop"], results["sanity-stop, again"]
    assert stopped["code"] == 128 + signal.SIGTERM, stopped["stderr"][-3000:]
    assert "Traceback" not in stopped["stdout"] + stopped["stderr"]
    at_stop = json.loads(stopped["read"])  # job 0's metrics.json right after the stop
    assert at_stop["status"] == "interrupted" and at_stop["last_checkpoint"]
    assert again["code"] == 0, again["stderr"][-3000:]
    for job in "01":
        resumed = _metrics(folder / "sanity-stop" / job)
        assert not _close(resumed, _metrics(folder / "uninterrupted" / job), rel=1e-5)


def test_a_killed_fused_sweep_resumes_from_its_last_epoch(data_dir, tmp_path):
    """kill -9 in the second epoch: the rerun continues both jobs from the first epoch's
    last.ckpt and ends where an uninterrupted sweep ends."""
    sweep = tmp_path / "killed"
    args = ["-m", "model.latent_dim=2,4", FUSED, *TINY, f"hydra.sweep.dir={sweep}"]
    script = PRELUDE + "\nimport sys\nfrom genlab.cli import train_command\ntrain_command()\n"
    env = {**command_env(data_dir), "TEST_STOP": "SIGKILL"}
    killed = subprocess.run(
        [sys.executable, "-c", script, *args],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (sweep / "0" / "metrics.json").exists()
    assert read_checkpoint(sweep / "0" / "checkpoints" / "last.ckpt", "test")["epoch"] == 0
    again, uninterrupted = run_commands(
        "genlab-train",
        [{"args": args}, {"args": [*args[:-1], f"hydra.sweep.dir={tmp_path / 'whole'}"]}],
        data_dir,
        tmp_path,
    )
    assert again["code"] == 0 and uninterrupted["code"] == 0, again["stderr"][-3000:]
    for job in "01":
        assert not _close(_metrics(sweep / job), _metrics(tmp_path / "whole" / job), rel=1e-5)
