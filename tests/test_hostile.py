"""Input from elsewhere, as a hostile user would give it: checkpoints that are not genlab's
or were changed on disk, crafted configs inside checkpoints, options that torch refuses
only when it builds them, broken sweep files, Hydra grammar. Each ends in one ``Error:``
paragraph and exit code 1, with nothing in any run directory changed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from commands import run_commands
from conftest import FAST
from genlab.checkpoints import WEIGHTS_HASH_KEY, load_model
from genlab.errors import GenlabError
from genlab.report import write_report

# The run every crafted checkpoint starts from; a resume repeats its overrides.
RUN = [*FAST, "model=vae", "model.latent_dim=3"]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _flip_4kib_of_weights(original: bytes, checkpoint: dict) -> bytes:
    """The file with 4 KiB inside the bytes of its largest tensor inverted."""
    largest = max(checkpoint["state_dict"].values(), key=torch.Tensor.numel)
    start = original.find(largest.numpy().tobytes()[:256])
    assert start > 0 and largest.numel() * 4 > 8192
    start += 2048
    flipped = bytes(b ^ 0xFF for b in original[start : start + 4096])
    return original[:start] + flipped + original[start + 4096 :]


def _variants(last: Path, folder: Path) -> dict[str, Path]:
    """Checkpoints that are not what genlab-train wrote, each in its own file."""
    checkpoint = torch.load(last, weights_only=True)
    weights = checkpoint["state_dict"]
    name, tensor = next((k, v) for k, v in weights.items() if v.dim() == 2)
    variants = {
        "no weights": {k: v for k, v in checkpoint.items() if k != "state_dict"},
        "misshapen weights": {
            **checkpoint,
            "state_dict": {**weights, name: tensor[:, :-1].clone()},
            WEIGHTS_HASH_KEY: None,
        },
        "NaN weights": {
            **checkpoint,
            "state_dict": {**weights, name: torch.full_like(tensor, math.nan)},
            WEIGHTS_HASH_KEY: None,
        },
        "another library's dict": {"model": dict(weights), "epoch": 3},
        "config not a mapping": {**checkpoint, "genlab_config": "model: vae"},
        "a list": [1, 2, 3],
    }
    paths = {}
    for label, content in variants.items():
        paths[label] = folder / f"{re.sub('[^a-zA-Z0-9]+', '_', label)}.ckpt"
        torch.save(content, paths[label])
    paths["4 KiB flipped"] = folder / "flipped.ckpt"
    paths["4 KiB flipped"].write_bytes(_flip_4kib_of_weights(last.read_bytes(), checkpoint))
    paths["not a checkpoint"] = folder / "notes.ckpt"
    paths["not a checkpoint"].write_text("these are my notes\n")
    return paths


# What each kind of checkpoint makes genlab say (resume and genlab-eval alike).
CHECKPOINT_MESSAGES = {
    "no weights": "holds no model weights",
    "misshapen weights": "do not fit the model",
    "NaN weights": "NaN or infinite weights",
    "another library's dict": "holds no training state|holds no run config",
    "config not a mapping": "not a mapping",
    "a list": "not a checkpoint that genlab-train wrote",
    "4 KiB flipped": "damaged|not a readable checkpoint",
    "not a checkpoint": "not a readable checkpoint",
}

# Options (beyond the checkpoint kinds) that each must be refused before the run starts.
BAD_TRAINING_OPTIONS = {
    "+model.optimizer.weight_decay=-1": "Invalid weight_decay value: -1",
    "+model.optimizer.betas=[2.0,0.5]": "Invalid beta parameter",
    "+model.optimizer.foreach=true": "cannot be `True` together",  # a RuntimeError in torch
    "model.scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true}": "step_size",
    "paths.checkpoint_dir={tmp}/a_file": "is not a folder",
    "hydra.run.dir={tmp}/a_file": "The run folder '{tmp}/a_file' cannot be created: a file",
    "model.latent_dim=[": "model.latent_dim=[",
    "~seed": "The config has no seed (an override such as ~seed removed it?)",
    "~eval": "The config has no eval",
    "seed=-1": "seed=-1",
    "resume={tmp}": "is not a checkpoint file",
    "data.batch_size=0": "data.batch_size=0",
}
BAD_EVAL_OPTIONS = {
    "eval.nll_samples=abc": "eval.nll_samples='abc'",
    "eval.nll_samples=0": "eval.nll_samples=0",
    "eval.knn_k=-2": "eval.knn_k=-2",
    "eval.device=tpu": "cpu, cuda",
    "eval.test_examples=1": "eval.test_examples=1",
    "~eval": "The config has no eval",
    "trusted_targets=m": "trusted_targets='m': each entry must be a module prefix ending with a dot",
}


@pytest.fixture(scope="module")
def hostile(data_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A short run, then every hostile input against it, in two interpreters (one per
    command); with the run folder's files before and after."""
    folder = tmp_path_factory.mktemp("hostile")
    run_dir = folder / "run"
    (folder / "a_file").write_text("not a folder\n")
    first = run_commands(
        "genlab-train", [{"args": [*RUN, f"hydra.run.dir={run_dir}"]}], data_dir, folder
    )
    assert first[0]["code"] == 0, first[0]["stderr"][-2000:]
    variants = _variants(run_dir / "checkpoints" / "last.ckpt", folder)
    before = files(run_dir)

    train_cases = {}
    for label, path in variants.items():
        train_cases["resume", label] = [*RUN, f"resume={path}", f"hydra.run.dir={folder / 'r'}"]
    for option in BAD_TRAINING_OPTIONS:
        own_dir = [] if option.startswith("hydra.run.dir") else [f"hydra.run.dir={folder / 't'}"]
        train_cases["train", option] = [*RUN, option.replace("{tmp}", str(folder)), *own_dir]
    # Another run, and a resume that is refused, pointed at the finished run's folder.
    train_cases["into the run", "fresh"] = [*RUN, "model.beta=2", f"hydra.run.dir={run_dir}"]
    train_cases["into the run", "resume"] = [
        *RUN,
        "model.beta=2",
        "resume=last",
        f"hydra.run.dir={run_dir}",
    ]
    eval_cases = {}
    for label, path in variants.items():
        eval_cases["eval", label] = [f"ckpt_path={path}", f"hydra.run.dir={folder / 'e'}"]
    last = run_dir / "checkpoints" / "last.ckpt"
    for option in BAD_EVAL_OPTIONS:
        eval_cases["eval", option] = [f"ckpt_path={last}", option, f"hydra.run.dir={folder / 'e'}"]
    eval_cases["eval", "into the run"] = [
        f"ckpt_path={last}",
        "eval.fid=false",
        f"hydra.run.dir={run_dir}",
    ]

    results = {}
    for command, cases in (("genlab-train", train_cases), ("genlab-eval", eval_cases)):
        done = run_commands(command, [{"args": a} for a in cases.values()], data_dir, folder)
        results.update(zip(cases, done, strict=True))
    return folder, {"results": results, "before": before, "after": files(run_dir)}


def _refused_cleanly(result: dict, pattern: str) -> None:
    assert result["code"] == 1, result["stderr"][-3000:]
    error = result["stderr"].strip()
    assert error.startswith("Error:") and "Traceback" not in error, error[-3000:]
    assert len(error.splitlines()) == 1, error  # one paragraph
    assert re.search(pattern, error), error


@pytest.mark.parametrize("label", list(CHECKPOINT_MESSAGES))
@pytest.mark.parametrize("command", ["resume", "eval"])
def test_a_checkpoint_that_genlab_did_not_write_is_refused_cleanly(hostile, command, label):
    folder, found = hostile
    _refused_cleanly(found["results"][command, label], CHECKPOINT_MESSAGES[label])
    # The refused command left no folder of its own behind.
    assert not (folder / ("r" if command == "resume" else "e")).exists()


@pytest.mark.parametrize("option", list(BAD_TRAINING_OPTIONS))
def test_an_option_torch_or_hydra_refuses_is_one_error_before_the_run_starts(hostile, option):
    folder, found = hostile
    _refused_cleanly(
        found["results"]["train", option],
        re.escape(BAD_TRAINING_OPTIONS[option].replace("{tmp}", str(folder))),
    )
    assert not (folder / "t").exists()


@pytest.mark.parametrize("option", list(BAD_EVAL_OPTIONS))
def test_a_bad_evaluation_option_is_one_error(hostile, option):
    folder, found = hostile
    _refused_cleanly(found["results"]["eval", option], re.escape(BAD_EVAL_OPTIONS[option]))
    assert not (folder / "e").exists()


def test_no_command_changes_a_finished_run_it_does_not_own(hostile):
    _, found = hostile
    results = found["results"]
    _refused_cleanly(results["into the run", "fresh"], "already holds the results")
    _refused_cleanly(results["into the run", "resume"], r"model\.beta was 1\.0, now 2\b")
    _refused_cleanly(
        results["eval", "into the run"], "genlab-eval writes only into a folder of its own"
    )
    assert found["after"] == found["before"]


class _Payload:
    """Unpickling this runs os.mkdir: what a malicious pickle would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return os.mkdir, (self.path,)


def test_a_checkpoint_is_data_a_crafted_target_or_pickle_is_never_called(hostile, data_dir):
    folder, _ = hostile
    checkpoint = torch.load(folder / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    crafted = {}
    # The model's reaches os.mkdir through genlab's own imports: a prefix check would pass it.
    targets = {"model": "genlab.models.base.private_api.os.mkdir", "data": "os.mkdir"}
    for part, target in targets.items():
        config = {**checkpoint["genlab_config"]}
        marker = folder / f"called_by_{part}"
        config[part] = {"_target_": target, "_args_": [str(marker)]}
        crafted[part] = folder / f"crafted_{part}.ckpt"
        torch.save({**checkpoint, "genlab_config": config}, crafted[part])
    pickled = folder / "pickled.ckpt"
    torch.save({**checkpoint, "extra": _Payload(folder / "called_by_pickle")}, pickled)

    with pytest.raises(
        GenlabError,
        match=r"model\._target_='genlab\.models\.base\.private_api\.os\.mkdir'.*a checkpoint is data",
    ):
        load_model(crafted["model"])
    cases = [
        {"args": [f"ckpt_path={path}", f"hydra.run.dir={folder / 'crafted_eval'}"]}
        for path in (*crafted.values(), pickled)
    ]
    results = run_commands("genlab-eval", cases, data_dir, folder)
    _refused_cleanly(
        results[0], r"asks to build model\._target_='genlab\.models\.base\.private_api"
    )
    _refused_cleanly(results[1], r"asks to build data\._target_='os\.mkdir'")
    _refused_cleanly(results[2], "not a file of tensors and plain data")
    resumed = run_commands(
        "genlab-train",
        [{"args": [*RUN, f"resume={crafted['model']}", f"hydra.run.dir={folder / 'cr'}"]}],
        data_dir,
        folder,
    )
    _refused_cleanly(
        resumed[0], r"model\._target_ was 'genlab\.models\.base\.private_api\.os\.mkdir'"
    )
    assert not list(folder.glob("called_by_*"))


def test_a_sweep_report_lists_a_job_whose_files_are_damaged_and_goes_on(tmp_path):
    def job(number: int, overrides: str, metrics: str) -> None:
        hydra = tmp_path / str(number) / ".hydra"
        hydra.mkdir(parents=True)
        (hydra / "overrides.yaml").write_text(overrides)
        (hydra / "config.yaml").write_text(f"model:\n  latent_dim: {number + 2}\n")
        (hydra / ".." / "metrics.json").write_text(metrics)

    finished = {"status": "completed", "test/nll": 90.0, "test/kl": 5.0, "test/recon": 85.0}
    job(0, "- model.latent_dim=2\n", json.dumps(finished))
    job(1, "- model.latent_dim=3\n", '{"status": "completed", "test/nll": 8')  # cut short
    job(2, "model.latent_dim: 4\n", json.dumps(finished))  # a mapping, not Hydra's list
    job(3, "- model.latent_dim=5\n", "[1, 2]")

    written = write_report(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert tmp_path / "summary.md" in written
    assert "4 jobs: 1 completed, 3 unreadable." in summary
    assert "- `1`: metrics.json cannot be read (" in summary
    assert "- `2`: .hydra/overrides.yaml holds a dict, not a list" in summary
    assert "- `3`: metrics.json holds a list, not a dict" in summary
    assert "**best** 0" in summary
