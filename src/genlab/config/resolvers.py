"""OmegaConf resolvers that genlab's configs use; registered when `genlab.config` is imported."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def eval_dir(ckpt_path: Any, log_dir: Any) -> str:
    """Where genlab-eval writes by default: ``<run dir>/eval`` beside the run whose
    checkpoint it evaluates (``<run dir>/checkpoints/<file>.ckpt``), the checkpoint's own
    folder's ``eval`` for a checkpoint elsewhere, and ``<log_dir>/eval`` without one."""
    if not ckpt_path:
        return f"{log_dir}/eval"
    folder = Path(str(ckpt_path)).parent
    run_dir = folder.parent if folder.name == "checkpoints" else folder
    return str(run_dir / "eval")


OmegaConf.register_new_resolver("genlab.eval_dir", eval_dir, replace=True)


# Longer sweep labels are cut and end in a hash of the whole, so that they stay unique.
_MAX_LABEL_BYTES = 120


def swept_keys(multirun_config: Any) -> list[str]:
    """The options a multirun varies: the keys of ``hydra.sweeper.params`` and of its command
    line that hold a sweep (``1,4``, ``choice(2, 4)``, ``interval(0.1, 1)``), a
    command-line value replacing a param's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = multirun_config.hydra.sweeper.get("params") or {}
    lines = [f"{key}={value}" for key, value in params.items() if isinstance(value, str)]
    lines += list(multirun_config.hydra.overrides.task)
    swept: dict[str, bool] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        swept[override.key_or_group] = override.is_sweep_override()
    return [key for key, is_sweep in swept.items() if is_sweep]


def sweep_label() -> str:
    """A sweep job's swept values, as a folder name (``latent_dim=2,beta=0.5``); empty for a
    single run. TensorBoard names the job's curves and HParams row by it.

    What the sweep varies comes from the multirun.yaml that the sweeper (Hydra's basic
    sweeper, genlab's Optuna sweeper) writes into the sweep folder before the first job:
    jobs in other processes or on other machines read the same file."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    hydra = HydraConfig.get()
    multirun = Path(hydra.sweep.dir) / "multirun.yaml"
    try:
        keys = swept_keys(OmegaConf.load(multirun))
    except (OSError, ValueError, AttributeError):  # no sweeper file: unnamed, as a single run
        return ""
    given = OverridesParser.create().parse_overrides(list(hydra.overrides.task))
    values = {o.key_or_group: o.input_line.split("=", 1)[-1] for o in given}
    short = [key.replace("/", ".").rsplit(".", 1)[-1] for key in keys]
    names = short if len(set(short)) == len(short) else [k.replace("/", ".") for k in keys]
    label = ",".join(
        f"{name}={values[key].replace('/', '-')}" for name, key in zip(names, keys) if key in values
    )
    if len(label.encode()) > _MAX_LABEL_BYTES:  # a folder name holds at most 255 bytes
        digest = hashlib.sha1(label.encode()).hexdigest()[:8]
        label = label.encode()[: _MAX_LABEL_BYTES - 9].decode(errors="ignore") + "~" + digest
    return label


OmegaConf.register_new_resolver("genlab.sweep_label", sweep_label, replace=True)
