"""genlab-eval and eval.after_fit: checkpoints of every family evaluated on the real test sets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from commands import run_commands
from conftest import FAST_EVAL
from genlab import visuals
from genlab.checkpoints import load_model
from genlab.config import compose_config
from genlab.errors import GenlabError, find_user_error
from genlab.evaluate import evaluate, format_table, generated_images
from genlab.train import train

NATS_METRICS = {"test/neg_elbo", "test/recon", "test/kl", "test/nll", "test/bpd"}
GENERATION_METRICS = {"test/fid", "test/fid_train_vs_test", "test/is", "test/is_test_set"}
CODE_METRICS = {"test/probe_acc", "test/knn_acc"}


def eval_cfg(ckpt_path, out_dir: Path, cache_dir: Path, *overrides: str):
    return compose_config(
        [
            *FAST_EVAL,
            f"ckpt_path={ckpt_path}",
            f"paths.output_dir={out_dir}",
            f"paths.cache_dir={cache_dir}",
            *overrides,
        ],
        config_name="eval",
    )


@pytest.fixture(scope="module")
def commands(vae_checkpoint, cache_dir, data_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The genlab-eval command lines below, run once in one interpreter: their folder,
    and their results."""
    folder = tmp_path_factory.mktemp("genlab_eval")
    cases = [
        [
            f"ckpt_path={vae_checkpoint}",
            f"hydra.run.dir={folder / 'eval'}",
            f"paths.cache_dir={cache_dir}",
            *FAST_EVAL,
        ],
        [f"ckpt_path={folder / 'nope.ckpt'}", f"hydra.run.dir={folder / 'missing'}"],
        # No hydra.run.dir: the evaluation goes beside the run it evaluates.
        [
            f"ckpt_path={vae_checkpoint}",
            f"paths.cache_dir={cache_dir}",
            *FAST_EVAL,
            "eval.fid=false",
        ],
    ]
    return folder, run_commands("genlab-eval", [{"args": a} for a in cases], data_dir, folder)


def test_an_evaluation_is_written_beside_the_run_it_evaluates(commands, vae_checkpoint):
    _, (*_, beside) = commands
    assert beside["code"] == 0, beside["stderr"][-3000:]
    (metrics,) = (vae_checkpoint.parent.parent / "eval").glob("*/metrics.json")
    assert json.loads(metrics.read_text())["checkpoint"] == str(vae_checkpoint.resolve())


def test_genlab_eval_writes_the_metrics_of_a_vae_checkpoint(commands, cache_dir):
    folder, (result, *_) = commands
    out_dir = folder / "eval"
    assert result["code"] == 0, result["stderr"][-3000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert NATS_METRICS | CODE_METRICS | GENERATION_METRICS <= metrics.keys()
    assert metrics["test/nll"] <= metrics["test/neg_elbo"] + 0.5
    assert metrics["test/neg_elbo"] - metrics["test/nll"] < 20
    assert metrics["test/neg_elbo"] == pytest.approx(metrics["test/recon"] + metrics["test/kl"])
    assert len(metrics["test/kl_per_dim"]) == 8 and 0 <= metrics["test/active_units"] <= 8
    # Trained on grey levels: the likelihood is measured on the fixed binary sample.
    assert metrics["binarize"] == "static" and metrics["train_binarize"] == "none"
    assert metrics["test_examples"] == 500 and metrics["nll_samples"] == 100
    assert 0.1 < metrics["test/probe_acc"] <= 1 and 0.1 < metrics["test/knn_acc"] <= 1
    assert metrics["test/fid"] > metrics["test/fid_train_vs_test"] > 0
    assert 1 <= metrics["test/is"] <= 10
    assert metrics["classifier_file"].startswith(str(cache_dir))
    # The table on the console says what the numbers are not.
    assert "never with FID/IS published for papers" in result["stderr"] + result["stdout"]
    # evaluate.log says what takes long while it runs.
    log_text = (out_dir / "evaluate.log").read_text()
    assert "Estimating test/nll: 500 test images, K = 100 importance samples each" in log_text
    assert re.search(r"test/nll: \d+ of 500 images", log_text)
    assert "test/nll estimated in" in log_text


def test_the_same_checkpoint_and_seed_give_the_same_numbers(vae_checkpoint, cache_dir, tmp_path):
    first = evaluate(eval_cfg(vae_checkpoint, tmp_path / "a", cache_dir, "eval.fid=false"))
    again = evaluate(eval_cfg(vae_checkpoint, tmp_path / "again", cache_dir, "eval.fid=false"))
    other = evaluate(
        eval_cfg(vae_checkpoint, tmp_path / "b", cache_dir, "eval.fid=false", "eval.seed=1")
    )
    timings = {"eval_wall_time_s"}
    assert {k: v for k, v in first.items() if k not in timings} == {
        k: v for k, v in again.items() if k not in timings
    }
    assert other["test/nll"] != first["test/nll"]
    assert other["test/nll"] == pytest.approx(first["test/nll"], abs=2.0)


@pytest.mark.parametrize(
    ("family", "expected", "absent"),
    [
        ("gan", GENERATION_METRICS, NATS_METRICS | CODE_METRICS | {"binarize"}),
        ("ae", {"test/recon", "test/mse"} | CODE_METRICS | GENERATION_METRICS, {"test/nll"}),
    ],
)
def test_each_family_gets_the_metrics_that_apply_to_it(
    make_cfg, cache_dir, tmp_path, family, expected, absent
):
    train(make_cfg(f"model={family}"))
    cfg = eval_cfg(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "eval", cache_dir)
    metrics = evaluate(cfg)
    assert expected <= metrics.keys()
    assert not absent & metrics.keys()
    assert metrics["model"] == family.upper() and metrics["dataset"] == "mnist"
    if family == "ae":
        assert 0 < metrics["test/mse"] < 0.25 < metrics["test/recon"]
        # Trained and scored on grey levels, where a Bernoulli decoder gives no likelihood.
        assert metrics["likelihood"] == (
            "Bernoulli cross-entropy of grey levels (not a normalised likelihood)"
        )


def test_a_continuous_bernoulli_vae_is_scored_on_grey_levels(make_cfg, cache_dir, tmp_path):
    train(make_cfg("model=vae", "model.recon_loss=cbernoulli", "data.binarize=none"))
    cfg = eval_cfg(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "eval", cache_dir)
    metrics = evaluate(cfg)
    assert metrics["binarize"] == "none"
    assert metrics["likelihood"].startswith("continuous Bernoulli density of grey levels")
    # The importance-sampled estimate is tighter than the bound it starts from.
    assert metrics["test/nll"] < metrics["test/neg_elbo"]
    assert "the decoder's continuous Bernoulli density" in format_table(metrics)


def test_after_fit_merges_the_evaluation_into_the_runs_metrics(make_cfg, cache_dir, tmp_path):
    metrics = train(
        make_cfg("model=vae", "eval.after_fit=true", *FAST_EVAL, f"paths.cache_dir={cache_dir}")
    )
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written == metrics
    assert {"test/nll", "test/fid", "test/probe_acc", "binarize"} <= written.keys()
    assert written["status"] == "completed" and written["test/nll"] < written["test/neg_elbo"]


def test_train_and_eval_configs_offer_the_same_evaluation_options():
    train_eval = OmegaConf.to_container(compose_config(config_name="train").eval)
    eval_eval = OmegaConf.to_container(compose_config(config_name="eval").eval)
    assert train_eval.pop("after_fit") is False
    assert train_eval.keys() == eval_eval.keys()


def test_the_cache_defaults_to_the_users_cache_folder(monkeypatch):
    monkeypatch.delenv("GENLAB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    cfg = compose_config(config_name="eval")
    assert OmegaConf.select(cfg, "paths.cache_dir") == "/somewhere/cache/genlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compose_config(config_name="eval").paths.cache_dir == "~/.cache/genlab"
    monkeypatch.setenv("GENLAB_CACHE_DIR", "/mine")
    assert compose_config(config_name="train").paths.cache_dir == "/mine"


def test_a_missing_checkpoint_is_one_clear_paragraph_without_a_traceback(commands):
    _, (_, result, _) = commands
    assert result["code"] not in (0, None, "uncaught")
    assert "Traceback" not in result["stderr"] + result["stdout"]
    (error,) = [line for line in result["stderr"].splitlines() if line.startswith("Error:")]
    assert "ckpt_path=" in error and "nope.ckpt" in error and "last.ckpt" in error


def test_checkpoints_of_the_wrong_kind_are_refused_by_name(cache_dir, tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    classifier = next(cache_dir.glob("classifier-*.pt"))  # a torch file, but no genlab run
    cases = [
        (None, "ckpt_path is required"),
        (text, "ckpt_path: .* is not a readable checkpoint"),
        (classifier, "genlab"),
    ]
    for path, message in cases:
        with pytest.raises(GenlabError, match=message):
            evaluate(eval_cfg("null" if path is None else path, tmp_path / "eval", cache_dir))


def test_bad_evaluation_options_name_the_option(vae_checkpoint, cache_dir, tmp_path):
    for override, option in [
        ("eval.nll_samples=0", "eval.nll_samples"),
        ("eval.device=tpu", "eval.device"),
        ("eval.classifier_epochs=0", "eval.classifier_epochs"),
        ("eval.test_examples=1", "eval.test_examples"),
    ]:
        cfg = eval_cfg(vae_checkpoint, tmp_path, cache_dir, override)
        with pytest.raises(Exception) as err:
            instantiate(cfg.eval)
        assert re.search(option, str(find_user_error(err.value))), err.value
        with pytest.raises(GenlabError, match=option):
            evaluate(cfg)


def test_the_samples_scored_for_an_ae_are_the_samples_its_pictures_show(make_cfg, tmp_path):
    # Pictures only at the end of fit: from the final weights, which a one-epoch run tests.
    cfg = make_cfg(
        "model=ae", "callbacks.images.every_n_epochs=0", "callbacks.images.fit_points=700"
    )
    metrics = train(cfg)
    model = load_model(tmp_path / "run" / metrics["tested_checkpoint"])
    # The picture decodes the first 64 draws of a CPU generator seeded 0 (genlab.callbacks).
    samples = generated_images(model, 64, torch.Generator().manual_seed(0), cfg.data)
    with Image.open(tmp_path / "run" / "images" / "samples_fitted_gaussian_final.png") as png:
        shown = torch.from_numpy(np.array(png.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(visuals.grid(samples, 8), shown[:, visuals.TITLE_HEIGHT :])
