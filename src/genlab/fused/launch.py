"""What ``hydra/launcher=fused`` does with a sweep's jobs: which train together, and the
records Hydra and the sweep expect of each job.

A job joins a fused group when its model can be stacked with the others' (`unfusable`
says why not) and its program, everything but the keys in `_FREE_IN_GROUP`, is the
same as theirs; resumed jobs group with jobs at the same step. Every job is planned as
a job of a basic sweep is (`genlab.continuation`): a finished one is reused, a stopped
one resumed, a folder holding other settings refused.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from genlab.config.validate import resolved, validate
from genlab.continuation import objective, plan_job, record_attempt
from genlab.errors import FolderTaken, GenlabError, exit_code, find_user_error
from genlab.resume import resume_checkpoint
from genlab.rundir import METRICS_FILE, owned, record_failure

log = logging.getLogger(__name__)

# Options that may differ between the jobs of one fused group: each member has its own.
_FREE_IN_GROUP = (
    "seed",
    "data.seed",
    "model.latent_dim",
    "model.beta",
    "model.kl_warmup_epochs",
    "paths",
    "resume",
    "objective",
    "eval",
    "logger.save_dir",
    "logger.version",
    "trainer.default_root_dir",
    "callbacks.model_checkpoint.dirpath",
    "callbacks.last_checkpoint.dirpath",
    "callbacks.images.dirpath",
)
# The families a group can stack, and their nets.
_FAMILIES = ("genlab.models.vae.VAE", "genlab.models.ae.AE")
_NETS = ("genlab.models.nets.MLP", "genlab.models.nets.Conv")
# Optimisers that update every parameter entry from its own gradient alone: one over the
# stacked parameters is one per member.
_ELEMENTWISE = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")
# The callbacks a fused group keeps for each job (conf/callbacks/default.yaml).
_KNOWN_CALLBACKS = ("model_checkpoint", "last_checkpoint", "progress_bar", "images", "hparams")


def unfusable(config: dict[str, Any]) -> str | None:
    """Why the job ``config`` (resolved) cannot train in a fused group, or None."""
    model, trainer = config.get("model", {}), config.get("trainer", {})
    family = _qualname(model.get("_target_"))
    if family not in _FAMILIES:
        return f"model {model.get('_target_')} (fused: AE and VAE)"
    net = model.get("net", {})
    if _qualname(net.get("_target_")) not in _NETS or net.get("norm", "none") != "none":
        return "its net (fused: MLP and conv nets without batch norm)"
    if model.get("compile"):
        return "model.compile=true"
    optimizer = str(model.get("optimizer", {}).get("_target_", "")).rsplit(".", 1)[-1]
    if optimizer not in _ELEMENTWISE:
        return f"model.optimizer {optimizer} (fused: {', '.join(_ELEMENTWISE)})"
    if str(trainer.get("devices", 1)) not in ("1", "[0]") or trainer.get("num_nodes", 1) != 1:
        return f"trainer.devices={trainer.get('devices')} (fused: one device, trainer.devices=1)"
    if str(trainer.get("strategy", "auto")) != "auto" or trainer.get("plugins"):
        return "trainer.strategy or trainer.plugins"
    if str(trainer.get("precision", "32-true")) not in ("32", "32-true"):
        return f"trainer.precision={trainer.get('precision')} (fused: 32-true)"
    if trainer.get("gradient_clip_val") or trainer.get("accumulate_grad_batches", 1) != 1:
        return "gradient clipping or accumulation (they act on the whole group's gradients)"
    if trainer.get("val_check_interval") not in (None, 1, 1.0):
        return "trainer.val_check_interval (fused: validation at the end of each epoch)"
    callbacks = {k: v for k, v in (config.get("callbacks") or {}).items() if v}
    other = sorted(set(callbacks) - set(_KNOWN_CALLBACKS))
    if other:
        return f"callbacks.{other[0]} (a callback of its own needs a Lightning Trainer of its own)"
    ranking = callbacks.get("model_checkpoint") or {}
    if ranking.get("every_n_train_steps") or ranking.get("train_time_interval"):
        return "callbacks.model_checkpoint saves between epochs"
    if ranking.get("save_last") or ranking.get("every_n_epochs", 1) not in (None, 1):
        return "callbacks.model_checkpoint.save_last or every_n_epochs"
    return None


def _qualname(target: Any) -> str | None:
    try:
        cls = get_class(str(target))
    except (ImportError, ValueError):  # an unknown class: validation names it
        return None
    return f"{cls.__module__}.{cls.__qualname__}"


def program_key(config: dict[str, Any]) -> str:
    """What the jobs of one group share: ``config`` without the keys each member has."""
    shared = copy.deepcopy(config)
    for key in _FREE_IN_GROUP:
        *parents, last = key.split(".")
        node = shared
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return json.dumps(shared, sort_keys=True, default=str)


def launch_jobs(
    launcher: Any, job_overrides: Sequence[Sequence[str]], first: int
) -> list[JobReturn]:
    """Hydra's ``Launcher.launch`` for ``hydra/launcher=fused``."""
    from genlab.fused.group import Member, build_member, train_group

    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs, fused where they can share one model", len(job_overrides))
    returns: dict[int, JobReturn] = {}
    alone: list[tuple[int, DictConfig]] = []
    groups: dict[str, list[tuple[int, DictConfig, Member]]] = {}
    for idx, overrides in enumerate(job_overrides, start=first):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        job_config = _job_config(launcher, list(overrides), idx)
        outcome = _prepare(job_config, sweep_dir, Member, build_member)
        if isinstance(outcome, JobReturn):
            returns[idx] = outcome
        elif isinstance(outcome, str):
            log.info("Job %d runs on its own: %s.", idx, outcome)
            alone.append((idx, job_config))
        else:
            member = outcome
            progress = (
                (member.checkpoint["epoch"], member.checkpoint["global_step"])
                if member.resume
                else None
            )
            key = f"{program_key(member.everything)}|{progress}"
            groups.setdefault(key, []).append((idx, job_config, member))
    stop: int | None = None
    for idx, job_config in alone:
        returns[idx] = run_job(
            hydra_context=launcher.hydra_context,
            task_function=launcher.task_function,
            config=job_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    size = launcher.max_members
    for jobs in groups.values():
        for start in range(0, len(jobs), size):
            chunk = jobs[start : start + size]
            code = _run_group(launcher, chunk, sweep_dir, train_group, returns)
            configure_log(config.hydra.hydra_logging, config.hydra.verbose)
            if code:
                stop = code
                break
        if stop:
            break
    if stop:  # Ctrl-C or SIGTERM stops the whole sweep, as in a basic sweep
        raise SystemExit(stop)
    return [returns[idx] for idx in sorted(returns)]


def _job_config(launcher: Any, overrides: list[str], idx: int) -> DictConfig:
    """The job's whole config, as Hydra's basic launcher composes it, with its folder."""
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    with open_dict(config):
        config.hydra.job.id = idx
        config.hydra.job.num = idx
    HydraConfig.instance().set_config(config)
    output_dir = os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    return config


def _task_config(job_config: DictConfig) -> DictConfig:
    task = copy.deepcopy(job_config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def _prepare(job_config: DictConfig, sweep_dir: Path, member_type: Any, build: Any) -> Any:
    """A job's member of a fused group; or why it runs alone (a string); or, for a job
    that does not train (reused, refused, failed), its `JobReturn`."""
    HydraConfig.instance().set_config(job_config)
    task = _task_config(job_config)
    job = Path(str(job_config.hydra.runtime.output_dir)).name
    try:
        everything = OmegaConf.to_container(task, resolve=True)
    except OmegaConfBaseException:  # a broken interpolation: the job's own run says which
        return "its config does not resolve"
    reason = unfusable(everything)
    if reason is not None or task.get("resume") is not None:
        return reason or "resume is set"
    try:
        plan = plan_job(task)
    except GenlabError as err:
        record_attempt(sweep_dir, job, "refused")
        print(f"Job {job} refused: {err}")
        return _job_return(job_config, task, objective(task, {}))
    record_attempt(sweep_dir, job, plan.action)
    if plan.action == "reuse":
        print(f"Job {job} finished earlier ({plan.metrics['status']}): reused, nothing ran.")
        return _job_return(job_config, task, objective(task, plan.metrics))
    try:
        run_config = resolved(
            task, ("model", "data", "trainer", "paths", "eval", "seed"), "genlab-train"
        )
        validate(run_config)
        member = member_type(
            cfg=OmegaConf.create(everything),
            composed=task,
            hydra_cfg=copy.deepcopy(HydraConfig.instance().cfg.hydra),
            run_config=run_config,
            everything=everything,
            resume=plan.action == "resume",
        )
        build(member)
    except Exception as err:  # noqa: BLE001 - recorded in the job's folder; the sweep goes on
        _failed(Path(str(job_config.hydra.runtime.output_dir)), task, err)
        return _job_return(job_config, task, objective(task, {}))
    if plan.action == "resume":
        print(f"Job {job} stopped earlier: continuing it from its last.ckpt.")
    return member


def _failed(output_dir: Path, task: DictConfig, err: BaseException) -> None:
    """Record in the job's folder that it failed, and log why."""
    user_error = find_user_error(err)
    record_failure(output_dir, task, user_error or err)
    if user_error is not None:
        log.error("Job failed: %s", user_error)
    else:
        log.error("Job failed", exc_info=err)


def _job_return(job_config: DictConfig, task: DictConfig, value: Any) -> JobReturn:
    """What Hydra's `run_job` returns for a job that ended with ``value``."""
    ret = JobReturn()
    ret.cfg = task
    ret.hydra_cfg = copy.deepcopy(OmegaConf.create({"hydra": job_config.hydra}))
    ret.overrides = OmegaConf.to_container(job_config.hydra.overrides.task)
    ret.working_dir = os.getcwd()
    ret.task_name = JobRuntime.instance().get("name")
    ret.return_value = value
    ret.status = JobStatus.COMPLETED
    return ret


def _run_group(
    launcher: Any,
    jobs: list[tuple[int, DictConfig, Any]],
    sweep_dir: Path,
    train_group: Any,
    returns: dict[int, JobReturn],
) -> int | None:
    """Train one group; fill in its jobs' returns. The exit code to stop the sweep with
    (the group was interrupted), else None."""
    callbacks = launcher.hydra_context.callbacks
    members, accepted = [], []
    with contextlib.ExitStack() as held:
        for idx, job_config, member in jobs:
            try:  # each job's folder is this process's while the group trains
                held.enter_context(owned(member.output_dir))
                if not member.resume:  # results written there since the sweep was planned
                    resume_checkpoint(
                        None, member.checkpoint_dir, member.run_config, member.output_dir
                    )
            except FolderTaken as err:
                record_attempt(sweep_dir, member.job, "refused")
                print(f"Job {member.job} refused: {err}")
                returns[idx] = _job_return(
                    job_config, member.composed, objective(member.composed, {})
                )
                continue
            HydraConfig.instance().set_config(job_config)
            callbacks.on_job_start(config=job_config, task_function=launcher.task_function)
            members.append(member)
            accepted.append((idx, job_config, member))
        if not members:
            return None
        first_config = accepted[0][1]
        HydraConfig.instance().set_config(first_config)
        with _job_logs(first_config, [m.output_dir for m in members[1:]]):
            try:
                train_group(members, sweep_dir)
            except Exception as err:  # noqa: BLE001 - recorded in each job's folder, as in a basic sweep
                for member in members:
                    # Results only count once written; a member evaluated in memory did not finish.
                    if not (member.output_dir / METRICS_FILE).is_file():
                        member.metrics = None
                        _failed(member.output_dir, member.composed, err)
    code = None
    for idx, job_config, member in accepted:
        metrics = member.metrics or {}
        if metrics.get("status") == "interrupted":
            code = exit_code(metrics["signal"])
        HydraConfig.instance().set_config(job_config)
        ret = _job_return(job_config, member.composed, objective(member.composed, metrics))
        callbacks.on_job_end(config=job_config, job_return=ret)
        returns[idx] = ret
    return code


@contextlib.contextmanager
def _job_logs(first_config: DictConfig, others: list[Path]) -> Any:
    """The group's log in every member's train.log (the first's as its own job log)."""
    configure_log(first_config.hydra.job_logging, first_config.hydra.verbose)
    root = logging.getLogger()
    template = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    added = []
    if template is not None:
        name = Path(template.baseFilename).name
        for folder in others:
            handler = logging.FileHandler(folder / name, delay=True)
            handler.setFormatter(template.formatter)
            handler.setLevel(template.level)
            root.addHandler(handler)
            added.append(handler)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
