"""Where the Hydra configs live, how to compose them outside the CLI, and the
start-up check that refuses a config genlab cannot run.

The check runs before any data is read or any object is built, so a typo
costs a second, not an epoch. It has two sources of truth:

- every ``_target_`` names a class or function; its signature says which
  keys the node may hold (unknown keys are refused with the closest match)
  and, through its type hints, which types they take;
- `RULES` below adds the ranges and choices genlab's own options must obey.

Hydra's own composition errors (an unknown group choice such as
``model=vea``, or ``model.latnet_dim=4`` on a key that does not exist) are
rewritten by `user_error_from_hydra` into the same one-paragraph form.
"""

from __future__ import annotations

import collections.abc
import contextlib
import difflib
import inspect
import os
import pathlib
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal import utils as hydra_utils
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
    SearchPathException,
)
from hydra.utils import get_object
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from genlab.data import BINARIZE, DATASETS
from genlab.errors import GenlabError, user_errors
from genlab.models.base import RECON_LOSSES
from genlab.models.nets import ACTIVATIONS, NORMS

_PACKAGE_DIR = Path(__file__).resolve().parent


def _find_conf_dir() -> Path:
    # A wheel carries the configs as genlab/conf; a source checkout (including
    # `pip install -e .`) keeps them at the repository's top level.
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"genlab's conf/ directory was not found next to {_PACKAGE_DIR}")


CONF_DIR = _find_conf_dir()


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose a config exactly as the CLI would, for notebooks and tests.

    Values that only exist inside a Hydra run (``${hydra:...}``) stay
    unresolved; pass ``paths.output_dir=<dir>`` to give the run a directory.
    Composition errors are raised as `GenlabError`, worded as the CLI words them.
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return compose(config_name=config_name, overrides=overrides or [])
        except (HydraException, ValueError) as err:
            user_error = user_error_from_hydra(err, overrides or [])
            if user_error is None:
                raise
            raise user_error from err


# -- Hydra's composition errors, reworded ------------------------------------------------------


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _unknown_key(path: str, key: str, known: list[str], owner: str) -> str:
    """Wording shared by Hydra's and genlab's unknown-key errors."""
    options = sorted(k for k in known if not (k.startswith("_") and k.endswith("_")))
    where = f"{path}.{key}" if path else key
    return (
        f"{where} is not an option of {owner}{_did_you_mean(key, options)}; "
        f"its options are {', '.join(options)}"
    )


def _one_paragraph(message: str) -> str:
    # Hydra appends the config search path to "not found" errors: noise for a user.
    message = message.split("\nConfig search path:")[0].split("\nSearch path:")[0]
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _group_set_to_null(overrides: list[str]) -> GenlabError | None:
    for override in overrides:
        group, _, value = override.partition("=")
        if value == "null" and (CONF_DIR / group).is_dir():
            options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            return GenlabError(
                f"{override}: {group} is a config group, which takes one of "
                f"{', '.join(options)}; to run without it, drop it with ~{group}."
            )
    return None


def user_error_from_hydra(err: BaseException, overrides: list[str]) -> GenlabError | None:
    """The one-paragraph `GenlabError` for a Hydra composition or override error, else None."""
    if isinstance(err, ValueError):  # Hydra raises a bare ValueError for group=null
        return _group_set_to_null(overrides)
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        options = list(err.options)
        return GenlabError(
            f"{group}={choice} is not a valid choice{_did_you_mean(choice, options)}; "
            f"choose one of {', '.join(options)}."
        )
    cause = err.__cause__
    if isinstance(err, ConfigCompositionException) and isinstance(
        cause, (ConfigKeyError, ConfigAttributeError)
    ):
        parent = cause.parent_node
        known = [str(k) for k in parent if k != "hydra"] if isinstance(parent, DictConfig) else []
        path, _, key = (cause.full_key or str(cause.key)).rpartition(".")
        owner = path or "the top-level config"
        return GenlabError(
            f"{_unknown_key(path, key, known, owner)}. Keys that are not in the config "
            f"can only be added with +key=value, for objects that accept them."
        )
    if isinstance(
        err,
        (ConfigCompositionException, OverrideParseException, SearchPathException),
    ):
        return GenlabError(_one_paragraph(str(err)))
    return None


@contextlib.contextmanager
def hydra_errors_as_user_errors() -> Iterator[None]:
    """Make the CLI report Hydra's composition errors as genlab's one-paragraph errors.

    ``hydra.main`` composes the config and reports errors itself (in
    ``hydra._internal.utils.run_and_report``) before any genlab code runs, so
    the only way to reword them is to wrap that reporter while the CLI runs.
    ``HYDRA_FULL_ERROR=1`` still gives the full traceback (see `user_errors`).
    """
    report = getattr(hydra_utils, "run_and_report", None)
    if report is None:  # another Hydra layout: keep its own reporting
        yield
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        def reworded() -> Any:
            with user_errors():
                try:
                    return func()
                except (HydraException, ValueError) as err:
                    user_error = user_error_from_hydra(err, sys.argv[1:])
                    if user_error is None:
                        raise
                    raise user_error from err

        return report(reworded)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = report


# -- the start-up check -------------------------------------------------------------------------

Check = Callable[[Any], str | None]


def _integer(minimum: int | None = None, maximum: int | None = None, *, none: str = "") -> Check:
    """An int (not a bool) in [minimum, maximum]; ``none`` describes what null means, if allowed."""
    bounds = (
        f"between {minimum} and {maximum}"
        if minimum is not None and maximum is not None
        else f">= {minimum}"
        if minimum is not None
        else ""
    )
    wanted = f"an integer {bounds}".strip() + (f", or null ({none})" if none else "")

    def check(value: Any) -> str | None:
        if value is None and none:
            return None
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
        return None if ok else f"must be {wanted}"

    return check


def _number(minimum: float, *, exclusive: bool = False) -> Check:
    wanted = f"a number {'>' if exclusive else '>='} {minimum:g}"

    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {wanted}"
        ok = value > minimum if exclusive else value >= minimum
        return None if ok else f"must be {wanted}"

    return check


def _choice(choices: collections.abc.Iterable[str]) -> Check:
    choices = tuple(choices)

    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _resume(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return None
    return "must be null (a fresh run), last, or the path of a .ckpt file"


# The ranges and choices of genlab's own options, checked wherever the key is
# present (model.beta only exists for the VAE). Types of all other options come
# from the signatures of the objects they configure.
RULES: dict[str, Check] = {
    "seed": _integer(0, 2**32 - 1),
    "resume": _resume,
    "model.latent_dim": _integer(1),
    "model.beta": _number(0),
    "model.kl_warmup_epochs": _integer(0),
    "model.recon_loss": _choice(RECON_LOSSES),
    "model.optimizer.lr": _number(0, exclusive=True),
    "model.net.activation": _choice(ACTIVATIONS),
    "model.net.norm": _choice(NORMS),
    "data.dataset": _choice(DATASETS),
    "data.binarize": _choice(BINARIZE),
    "data.batch_size": _integer(1),
    "data.eval_batch_size": _integer(1),
    "data.val_size": _integer(0),
    "trainer.max_epochs": _integer(-1, none="Lightning's default of 1000; -1: no limit"),
    "callbacks.last_checkpoint.every_n_train_steps": _integer(1, none="at epoch ends only"),
}


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits the type hint: True, False, or None when the hint is beyond this check."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if inspect.isclass(hint) and issubclass(hint, (os.PathLike, pathlib.PurePath)):
        return isinstance(value, str)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, arg) for arg in args]
        return True if True in results else None if None in results else False
    if origin in (list, tuple, collections.abc.Sequence) and args:
        if origin is tuple and args[1:] != (...,):  # a fixed-length tuple: beyond this check
            return None
        if not isinstance(value, (list, tuple)):
            return False
        results = [_matches(item, args[0]) for item in value]
        return False if False in results else None if None in results else True
    return None


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if hint is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        literals = [v for a in args if typing.get_origin(a) is typing.Literal for v in a.__args__]
        others = [_describe(a) for a in args if typing.get_origin(a) is not typing.Literal]
        choices = [f"one of {', '.join(dict.fromkeys(map(str, literals)))}"] if literals else []
        return " or ".join(choices + others)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if inspect.isclass(hint) and issubclass(hint, (os.PathLike, pathlib.PurePath)):
        return "a path"
    return str(hint)


def _signature(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any]] | None:
    """The parameters a config node may set on ``target``, and their type hints."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        parameters = dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return None
    function = inspect.unwrap(function)
    try:
        hints = typing.get_type_hints(function)
    except (NameError, TypeError, AttributeError):  # a hint only type checkers can resolve
        hints = {}
    return parameters, hints


def _check_target(path: str, node: Mapping[str, Any], problems: dict[str, str]) -> None:
    target_name = node["_target_"]
    try:
        target = get_object(target_name)
    except (ImportError, AttributeError, ValueError):
        problems[f"{path}._target_"] = f"{path}._target_={target_name!r} cannot be imported"
        return
    signature = _signature(target)
    if signature is None:
        return
    parameters, hints = signature
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key, value in node.items():
        if key.startswith("_") and key.endswith("_"):  # _target_, _partial_, _recursive_, ...
            continue
        where = f"{path}.{key}" if path else key
        if key not in parameters:
            if not open_ended:
                problems[where] = _unknown_key(path, key, list(parameters), target_name)
            continue
        hint = hints.get(key)
        if hint is not None and _matches(value, hint) is False:
            problems[where] = f"{where}={value!r} must be {_describe(hint)}"


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


def validate(config: Mapping[str, Any]) -> None:
    """Refuse a resolved run config (plain dicts) that genlab cannot run.

    Checks every ``_target_`` node's keys and types against the target's
    signature, and genlab's options against `RULES`. All problems found are
    reported together in one `GenlabError`.
    """
    problems: dict[str, str] = {}
    _walk(config, "", problems)
    for key, check in RULES.items():
        present, value = _lookup(config, key)
        if present and (problem := check(value)):
            problems[key] = f"{key}={value!r} {problem}"
    _raise_if_any(problems)


def _raise_if_any(problems: dict[str, str]) -> None:
    if problems:
        raise GenlabError(
            "Invalid configuration: " + "; ".join(problems[k] for k in sorted(problems)) + "."
        )


def check_training_setup(config: Mapping[str, Any], model: Any) -> None:
    """Refuse combinations Lightning would only reject once training has started.

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
    _raise_if_any(problems)
