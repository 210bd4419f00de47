"""The start-up check: a config genlab cannot run is refused before any data is read or
any object is built, so a typo costs a second, not an epoch.

Every ``_target_`` names a class or function; its signature says which keys the node may
hold (an unknown key is refused with the closest match), and its type hints which values
they take (types, choices and ranges: see `genlab.options`). The few options that no
genlab signature takes are declared below. Every problem found is reported at once.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Annotated, Any

from genlab.errors import GenlabError
from genlab.options import Explained, Range, problem, raise_if_any, type_hints, unknown

# Options that are not arguments of a genlab class: the top level of conf/train.yaml, and
# bounds genlab needs on arguments of other packages' classes. By config key.
OTHER_OPTIONS: dict[str, Any] = {
    "seed": Annotated[int, Range(0, 2**32 - 1)],
    "resume": Annotated[
        str | None, Explained("null (a fresh run), last, or the path of a .ckpt file")
    ],
    "objective": str | None,
    "trainer.max_epochs": Annotated[int, Range(-1, note="-1: no limit")] | None,
    "model.optimizer.lr": Annotated[float, Range(0, exclusive=True)],
}


def _import(dotted: str) -> Any:
    """The object a ``_target_`` names: the longest importable module, then attributes.
    (``hydra.utils.get_object`` would log an error of its own before the one paragraph.)"""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for name in parts[end:]:
            found = getattr(found, name)
        return found
    raise ImportError(dotted)


def _check_target(path: str, node: Mapping[str, Any], problems: dict[str, str]) -> None:
    target_name = node["_target_"]
    try:
        target = _import(target_name)
    except (ImportError, AttributeError, ValueError):
        hint = (
            " (a config written by another version of genlab? Rerun it with the genlab "
            "commit its run directory's environment.json records)"
            if str(target_name).startswith("genlab.")
            else ""
        )
        problems[f"{path}._target_"] = f"{path}._target_={target_name!r} cannot be imported{hint}"
        return
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return
    hints = type_hints(target)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key, value in node.items():
        if key.startswith("_") and key.endswith("_"):  # _target_, _partial_, _recursive_, ...
            continue
        where = f"{path}.{key}" if path else key
        if key not in parameters:
            if not open_ended:
                problems[where] = unknown(path, key, parameters, target_name)
        elif key in hints and (found := problem(where, value, hints[key])):
            problems[where] = found


def _walk(node: Any, path: str, problems: dict[str, str]) -> None:
    if isinstance(node, Mapping):
        if "_target_" in node:
            _check_target(path, node, problems)
        for key, value in node.items():
            _walk(value, f"{path}.{key}" if path else str(key), problems)


def _lookup(config: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def resolved(cfg: Any, needs: tuple[str, ...], command: str) -> dict[str, Any]:
    """The composed config ``cfg`` as plain dicts, with its interpolations resolved, once it
    holds every top-level section in ``needs``; else a `GenlabError` (a section deleted
    with ``~key``, an interpolation pointing at nothing)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    missing = [key for key in needs if key not in cfg]
    if missing:
        raise GenlabError(
            f"The config has no {', '.join(missing)} (an override such as ~{missing[0]} removed "
            f"it?); {command} needs {', '.join(needs)}. Choose another instead of removing one, "
            f"e.g. model=ae, or leave it at its default."
        )
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        where = f" (at {err.full_key})" if getattr(err, "full_key", None) else ""
        raise GenlabError(
            f"The config cannot be resolved: {reason}{where}. Did an override remove (~key) or "
            f"misspell something it refers to? genlab-train --cfg job shows the composed config."
        ) from err


def validate(config: Mapping[str, Any]) -> None:
    """Refuse a resolved run config (plain dicts) that genlab cannot run, with one
    `GenlabError` that lists every problem found."""
    problems: dict[str, str] = {}
    _walk(config, "", problems)
    for key, hint in OTHER_OPTIONS.items():
        present, value = _lookup(config, key)
        if present and (found := problem(key, value, hint)):
            problems[key] = found
    raise_if_any(problems, "Invalid configuration: ")


def check_training_setup(config: Mapping[str, Any], model: Any) -> None:
    """Refuse combinations Lightning or torch would only reject once training has started.

    ``model`` is the built LightningModule: whether it optimises manually (the
    GAN) and which metrics it logs (``metric_names``) decide what the trainer
    and the callbacks may ask of it.
    """
    problems: dict[str, str] = {}
    family = f"{type(model).__module__}.{type(model).__qualname__}"
    trainer = config.get("trainer") or {}
    if not model.automatic_optimization:
        for key, neutral in (("gradient_clip_val", None), ("accumulate_grad_batches", 1)):
            value = trainer.get(key, neutral)
            if value not in (neutral, 0):
                problems[f"trainer.{key}"] = (
                    f"trainer.{key}={value!r} cannot be used with {family}, which steps its "
                    f"optimisers itself (manual optimisation, which Lightning's {key} does "
                    f"not support); leave it at {neutral if neutral is not None else 'null'}"
                )
    binarize = (config.get("data") or {}).get("binarize", "none")
    if getattr(model, "recon_loss", None) == "cbernoulli" and binarize != "none":
        problems["model.recon_loss"] = (
            f"model.recon_loss='cbernoulli' is a density of grey levels, and data.binarize="
            f"{binarize!r} makes every pixel 0 or 1, where that density has no maximum (the "
            f"loss falls without end); train it with data.binarize=none, or use "
            f"model.recon_loss=bce for binary pixels"
        )
    validates = (config.get("data") or {}).get("val_size", 1) != 0
    logged = [f"train/{name}" for name in model.metric_names]
    logged += [f"val/{name}" for name in model.metric_names if validates]
    for name, callback in (config.get("callbacks") or {}).items():
        monitor = callback.get("monitor") if isinstance(callback, Mapping) else None
        if not isinstance(monitor, str):
            continue
        per_step = monitor.startswith("train/") and monitor.removesuffix("_step") in logged
        if monitor not in logged and not per_step:
            problems[f"callbacks.{name}.monitor"] = (
                f"callbacks.{name}.monitor={monitor!r} is not a metric {family} logs "
                f"(it logs {', '.join(logged)}); monitor one of those, or for a model without "
                f"a validation loss (model=gan) use callbacks=last_checkpoint_only"
            )
    try:  # a dry run: torch checks optimiser and scheduler arguments only when building them
        model.configure_optimizers()
    except (ValueError, TypeError, RuntimeError, KeyError) as err:
        problems["model.optimizer"] = (
            f"torch refused the optimiser or learning-rate schedule built from model.optimizer "
            f"and model.scheduler: {err}. Correct that value (torch.optim's documentation gives "
            f"each option's range)"
        )
    raise_if_any(problems)
