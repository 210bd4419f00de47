"""Sweeps: multiruns through Hydra's launchers, presets, failing jobs, and genlab-report."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from commands import run_commands
from genlab import report
from genlab.cli import report_command
from genlab.config import CONF_DIR
from genlab.config.resolvers import sweep_label, swept_keys
from test_ddp import DDP

TINY = [
    "model=vae",
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=5",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.images.latent_points=300",
    "callbacks.images.projector_points=0",
]


def read_csv(path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def make_job(sweep_dir, folder, overrides, metrics=None, picture=None) -> None:
    """A job folder as a multirun leaves it."""
    job = sweep_dir / folder
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    values = dict(item.split("=") for item in overrides)
    config = {
        "model": {
            "latent_dim": int(values["model.latent_dim"]),
            "beta": float(values["model.beta"]),
        }
    }
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if picture is not None:
        (job / "images").mkdir()
        Image.new("RGB", (64, 48), picture).save(job / "images" / "latent_final.png")


def vae_metrics(recon: float, kl: float) -> dict:
    return {
        "status": "completed",
        "epochs": 3,
        "wall_time_s": 12.5,
        "test/recon": recon,
        "test/kl": kl,
        "test/neg_elbo": recon + kl,
        "val/loss": recon + kl + 1,
    }


def test_the_report_of_a_partly_failed_and_still_running_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    common = ["trainer.max_epochs=3"]
    make_job(
        sweep, "0", [*common, "model.latent_dim=2", "model.beta=1"], vae_metrics(150, 6), "red"
    )
    make_job(
        sweep, "1", [*common, "model.latent_dim=8", "model.beta=1"], vae_metrics(100, 20), "blue"
    )
    make_job(
        sweep,
        "2",
        [*common, "model.latent_dim=2", "model.beta=4"],
        {"status": "failed", "error": "model.net.activation='bogus' is not a valid choice"},
    )
    make_job(sweep, "10", [*common, "model.latent_dim=8", "model.beta=4"])  # no metrics yet
    # A genlab-eval run inside job 1's folder is not a job of the sweep.
    (sweep / "1" / "eval" / "2026-12-01_10-00-00" / ".hydra").mkdir(parents=True)
    (sweep / "1" / "eval" / "2026-12-01_10-00-00" / ".hydra" / "overrides.yaml").write_text("[]\n")

    report_command([str(sweep)])

    rows = read_csv(sweep / "summary.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]  # by job number, not as text
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "unfinished"]
    # The swept values get columns; an override every job shares does not.
    assert {"model.latent_dim", "model.beta"} <= rows[0].keys()
    assert "trainer.max_epochs" not in rows[0]
    assert [r["best"] for r in rows] == ["False", "True", "False", "False"]  # lowest -ELBO: 120
    assert float(rows[1]["test/neg_elbo"]) == 120 and rows[3]["test/neg_elbo"] == ""

    markdown = (sweep / "summary.md").read_text()
    assert markdown.startswith("# Sweep over model.beta, model.latent_dim\n")
    # A reader sees the numbers come from 3-epoch runs.
    assert "Every job ran with: `trainer.max_epochs=3` (and what its row shows)." in markdown
    assert "4 jobs: 2 completed, 1 failed, 1 unfinished." in markdown
    assert "| **best** 1 | 1 | 8 | completed |" in markdown
    assert "`2`: model.net.activation='bogus' is not a valid choice" in markdown

    for figure in (report.RATE_DISTORTION, report.METRIC_VS_LATENT_DIM, report.LATENTS_GRID):
        with Image.open(sweep / figure) as image:
            assert image.width > 300 and image.height > 200
    assert str(sweep / "summary.md") in capsys.readouterr().out


def test_the_latents_grid_puts_every_jobs_codes_on_one_scale(tmp_path):
    spreads = {"0": 1.0, "1": 40.0}  # beta = 4 keeps codes near the prior; beta = 0 does not
    for job, spread in spreads.items():
        make_job(tmp_path, job, [f"model.beta={4 - 4 * int(job)}", "model.latent_dim=2"])
        (tmp_path / job / "images").mkdir()
        points = np.random.default_rng(0).normal(0.0, spread, (50, 2)).astype(np.float32)
        np.savez(
            tmp_path / job / "images" / "latent_final.npz",
            points=points,
            labels=np.arange(50) % 10,
            axes=np.array(["z1", "z2"]),
            note=np.array(""),
            class_names=np.array([str(d) for d in range(10)]),
        )
    # A job from before points were saved shows its picture; one with a damaged file too.
    make_job(tmp_path, "2", ["model.beta=1", "model.latent_dim=2"], picture="white")
    make_job(tmp_path, "3", ["model.beta=2", "model.latent_dim=2"], picture="white")
    (tmp_path / "3" / "images" / "latent_final.npz").write_bytes(b"not an npz")

    jobs = report.find_jobs(tmp_path)
    panels = [
        (job.folder.name, report._latent_points(job), report._latent_picture(job)) for job in jobs
    ]
    assert [points is None for _, points, _ in panels] == [False, False, True, True]
    figure = report._plot_panels(panels, tmp_path / "grid.png", " (4 of 9 jobs)")
    small, large, picture, _ = figure.axes[:4]
    assert small.get_xlim() == large.get_xlim() and small.get_ylim() == large.get_ylim()
    assert small.get_xlim()[1] > 40  # the wide job's range: the narrow one looks narrow
    assert not picture.axison and picture.get_images()
    assert figure.get_suptitle().endswith("on one scale (4 of 9 jobs)")
    assert report.plot_latents_grid(jobs, tmp_path / report.LATENTS_GRID)


def test_the_report_of_a_256_job_sweep_is_complete_and_its_figures_summarise(tmp_path):
    for index in range(256):
        latent_dim, beta = 2 + index // 16, 0.25 * (1 + index % 16)
        make_job(
            tmp_path,
            str(index),
            [f"model.latent_dim={latent_dim}", f"model.beta={beta}"],
            metrics=vae_metrics(recon=100.0 + beta, kl=10.0 / beta),
            picture="white",
        )
    written = report.write_report(tmp_path)
    assert len(read_csv(tmp_path / "summary.csv")) == 256  # the table is complete
    assert (tmp_path / report.RATE_DISTORTION) in written
    # The latents grid shows a sample of the jobs: at most 5 x 5 panels of 320 x 300 pixels.
    with Image.open(tmp_path / report.LATENTS_GRID) as grid:
        assert grid.width <= 5 * 320 and grid.height <= 5 * 300 + 40  # and a title line


def test_the_report_of_a_folder_without_jobs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report_command([str(tmp_path)])
    assert exit_info.value.code == 1
    assert "holds no jobs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report_command([str(tmp_path / "missing")])
    assert "is not a folder" in capsys.readouterr().err


LAUNCHERS = ("joblib", "submitit_local")


@pytest.fixture(scope="module")
def sweeps(data_dir, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The sweeps below, run once, one after another from one interpreter: their folder
    (a sweep's is ``<folder>/<name>``), and the result of each by name."""
    folder = tmp_path_factory.mktemp("sweeps")
    cases = {
        "failing": [*TINY, "model.latent_dim=2", "model.net.activation=relu,bogus"],
        **{
            launcher: [f"hydra/launcher={launcher}", *TINY, "model.latent_dim=2,3"]
            for launcher in LAUNCHERS
        },
        "optuna": ["+sweep=optuna_vae", "hydra.sweeper.n_trials=2", *TINY[1:]],
        "local ddp": [*DDP, "model.latent_dim=2,3"],
    }
    runs = [
        {"args": ["-m", *args, f"hydra.sweep.dir={folder / name}"]} for name, args in cases.items()
    ]
    # The failing sweep's command again, into its folder.
    runs.append({**runs[0], "read": str(folder / "failing" / "0" / "metrics.json")})
    results = run_commands("genlab-train", runs, data_dir, folder)
    return folder, dict(zip([*cases, "failing again"], results, strict=True))


def test_a_sweep_goes_on_past_a_failing_job_and_reports_itself(sweeps):
    folder, results = sweeps
    sweep, result = folder / "failing", results["failing"]
    assert result["code"] == 0, result["stderr"][-3000:]
    done, failed = (json.loads((sweep / job / "metrics.json").read_text()) for job in "01")
    assert done["status"] == "completed" and "test/neg_elbo" in done
    assert failed["status"] == "failed" and "'bogus'" in failed["error"]
    console = result["stdout"] + result["stderr"]
    assert "Traceback" not in console
    assert "Job failed: Invalid configuration: model.net.activation='bogus'" in console

    # The report was written when the sweep ended, and the log says where.
    assert f"Sweep report: {sweep / 'summary.md'}" in console
    rows = read_csv(sweep / "summary.csv")
    assert [(r["model.net.activation"], r["status"]) for r in rows] == [
        ("relu", "completed"),
        ("bogus", "failed"),
    ]
    assert (sweep / report.RATE_DISTORTION).is_file() and (sweep / report.LATENTS_GRID).is_file()


def test_rerunning_a_sweep_reuses_finished_jobs_and_retries_failed_ones(sweeps):
    _, results = sweeps
    again = results["failing again"]
    assert again["code"] == 0, again["stderr"][-3000:]
    assert "Job 0 finished earlier (completed): reused, nothing ran." in again["stdout"]
    assert json.loads(again["read"])["status"] == "completed"  # job 0's results, untouched
    assert "Job failed: Invalid configuration: model.net.activation='bogus'" in again["stdout"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_parallel_and_cluster_launchers_run_every_job(sweeps, launcher):
    folder, results = sweeps
    sweep, result = folder / launcher, results[launcher]
    assert result["code"] == 0, result["stderr"][-3000:]
    for job in "01":
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["status"] == "completed"
        # TensorBoard names each job's curves by what the sweep varied.
        events = (sweep / job / "tensorboard" / f"latent_dim={2 + int(job)}").glob("events.*")
        assert list(events)
    assert (sweep / "summary.md").is_file()
    if launcher == "joblib":
        # Two jobs at once share the cores instead of each taking them all.
        log_text = (sweep / "0" / "train.log").read_text()
        threads = int(re.search(r"torch CPU threads: (\d+)", log_text).group(1))
        assert threads * 2 <= max(2, os.cpu_count())


def test_tensorboards_hparams_table_of_a_sweep_leads_with_the_swept_option(sweeps):
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer as multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    folder, _ = sweeps
    runs = multiplexer.EventMultiplexer()
    runs.AddRunsFromDirectory(str(folder / "joblib"))
    runs.Reload()
    provider = data_provider.MultiplexerDataProvider(runs, str(folder / "joblib"))
    hparams = backend_context.Context(
        base_plugin.TBContext(logdir=str(folder), multiplexer=runs, data_provider=provider)
    )
    request = context.RequestContext()
    # What the HParams tab asks for: the five columns it shows before any click.
    experiment = hparams.experiment_from_metadata(
        request,
        "",
        True,
        hparams.hparams_metadata(request, ""),
        hparams.hparams_from_data_provider(request, "", 5),
        5,
    )
    first = experiment.hparam_infos[0]
    assert (first.name, first.differs) == ("latent_dim", True)
    assert (first.domain_interval.min_value, first.domain_interval.max_value) == (2, 3)
    assert not any(info.differs for info in experiment.hparam_infos[1:])
    assert "test/neg_elbo" in {info.name.tag for info in experiment.metric_infos}


def test_a_sweep_job_is_named_by_the_options_the_sweep_varies():
    multirun = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"params": {"model.beta": "1,4", "model.latent_dim": "2,4", "seed": 3}},
                "overrides": {"task": ["model.latent_dim=8", "model/net=conv,mlp", "data=mnist"]},
            }
        }
    )
    # A command-line value replaces the sweeper's param: latent_dim is fixed at 8 here.
    assert swept_keys(multirun) == ["model.beta", "model/net"]
    optuna = OmegaConf.load(CONF_DIR / "sweep" / "optuna_vae.yaml")
    optuna.hydra.overrides = {"task": ["+sweep=optuna_vae"]}
    assert swept_keys(optuna) == ["model.beta", "model.latent_dim", "model.optimizer.lr"]
    assert sweep_label() == ""  # outside a multirun job


def test_optuna_minimises_the_objective_the_jobs_report(sweeps):
    folder, results = sweeps
    sweep, result = folder / "optuna", results["optuna"]
    assert result["code"] == 0, result["stderr"][-3000:]
    scores = [
        json.loads((sweep / job / "metrics.json").read_text())["val/neg_elbo"] for job in "01"
    ]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(scores))
    assert {"model.beta", "model.latent_dim", "model.optimizer.lr"} == best["best_params"].keys()


def test_a_stopped_optuna_sweep_continues_its_study(data_dir, tmp_path):
    import optuna

    sweep = tmp_path / "optuna"
    command = ["-m", "+sweep=optuna_vae", *TINY[1:], f"hydra.sweep.dir={sweep}"]
    (first,) = run_commands(
        "genlab-train", [{"args": [*command, "hydra.sweeper.n_trials=2"]}], data_dir, tmp_path
    )
    assert first["code"] == 0, first["stderr"][-3000:]
    # The sweep is killed while its third trial runs: the study says the trial is running.
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    distributions = {  # as the sweeper reads +sweep=optuna_vae's params
        "model.beta": optuna.distributions.UniformDistribution(0.25, 4.0),
        "model.latent_dim": optuna.distributions.CategoricalDistribution([2, 4, 8, 16, 32]),
        "model.optimizer.lr": optuna.distributions.LogUniformDistribution(1e-4, 1e-2),
    }
    stopped = optuna.load_study(study_name="genlab", storage=storage).ask(distributions)

    (again,) = run_commands(
        "genlab-train", [{"args": [*command, "hydra.sweeper.n_trials=4"]}], data_dir, tmp_path
    )
    assert again["code"] == 0, again["stderr"][-3000:]
    assert "Continuing Optuna study 'genlab': 2 trials finished earlier, 2 to go from job 3" in (
        again["stdout"] + again["stderr"]
    )
    trials = optuna.load_study(study_name="genlab", storage=storage).trials
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[3].params == stopped.params  # the stopped trial, proposed again first
    assert trials[2].user_attrs == {"genlab_stopped": True}
    # The continued sampler does not repeat the first run's proposals.
    assert trials[4].params not in (trials[0].params, trials[1].params)
    # TensorBoard names each trial's run by its values (the sweeper says what it varies).
    (run,) = (sweep / "4" / "tensorboard").iterdir()
    assert run.name == ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in trials[4].params.items())
    # Each trial's job folder is numbered as the study numbers the trial.
    for number in (0, 1, 3, 4):
        metrics = json.loads((sweep / str(number) / "metrics.json").read_text())
        assert metrics["val/neg_elbo"] == pytest.approx(trials[number].value)
    assert not (sweep / "2").exists()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(t.value for t in trials if t.value is not None)


@pytest.mark.parametrize(
    ("preset", "model", "swept"),
    [
        ("latent_beta", "VAE", {"model.latent_dim": "2,4,8,16", "model.beta": "0.5,1,2,4"}),
        ("ae_latent", "AE", {"model.latent_dim": "2,4,8,16,32"}),
        ("gan_latent", "GAN", {"model.latent_dim": "16,32,64,128"}),
        (
            "optuna_vae",
            "VAE",
            {
                "model.beta": "interval(0.25, 4.0)",
                "model.latent_dim": "choice(2, 4, 8, 16, 32)",
                "model.optimizer.lr": "tag(log, interval(1e-4, 1e-2))",
            },
        ),
    ],
)
def test_sweep_presets_choose_the_model_and_the_grid(preset, model, swept):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"+sweep={preset}"], return_hydra_config=True)
    assert cfg.model._target_ == f"genlab.models.{model}"
    assert dict(cfg.hydra.sweeper.params) == swept


def test_a_local_sweep_of_ddp_runs_is_refused(sweeps):
    result = sweeps[1]["local ddp"]
    assert result["code"] == 1
    assert "cannot run inside a local sweep (-m)" in result["stderr"]
    assert "hydra/launcher=slurm" in result["stderr"] and "Traceback" not in result["stderr"]
