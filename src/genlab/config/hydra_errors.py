"""Hydra's composition errors (``model=vea``, ``model.latnet_dim=4``, a bad override) as
genlab's one-paragraph `GenlabError`, for the command line and for `compose_config`."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
    SearchPathException,
)
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from genlab import private_api
from genlab.disk import disk_errors
from genlab.errors import GenlabError, user_errors
from genlab.options import did_you_mean, unknown


def _one_paragraph(message: str) -> str:
    # Hydra appends the config search path to "not found" errors: noise for a user.
    message = message.split("\nConfig search path:")[0].split("\nSearch path:")[0]
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _group_set_to_null(overrides: list[str], conf_dir: Path) -> GenlabError | None:
    for override in overrides:
        group, _, value = override.partition("=")
        if value == "null" and (conf_dir / group).is_dir():
            options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
            return GenlabError(
                f"{override}: {group} is a config group, which takes one of "
                f"{', '.join(options)}; to run without it, drop it with ~{group}."
            )
    return None


def _in_task(err: BaseException) -> bool:
    """Whether ``err`` was raised by genlab's own work, not by Hydra setting up the run."""
    own = ("cli.py", "hydra_errors.py", "private_api.py")
    return any(
        "genlab" in Path(frame.filename).parts and not frame.filename.endswith(own)
        for frame in traceback.extract_tb(err.__traceback__)
    )


def user_error_from_hydra(
    err: BaseException, overrides: list[str], conf_dir: Path
) -> GenlabError | None:
    """The one-paragraph `GenlabError` for a Hydra composition or override error, else None."""
    if (
        isinstance(err, (FileExistsError, NotADirectoryError))
        and err.filename
        and not _in_task(err)
    ):
        return GenlabError(
            f"The run folder {str(err.filename)!r} cannot be created: a file is in its way "
            f"({err.strerror}). Choose another hydra.run.dir (hydra.sweep.dir for a sweep) or "
            f"paths.log_dir."
        )
    if isinstance(err, ValueError):  # Hydra raises a bare ValueError for group=null
        return _group_set_to_null(overrides, conf_dir)
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        options = list(err.options)
        return GenlabError(
            f"{group}={choice} is not a valid choice{did_you_mean(choice, options)}; "
            f"choose one of {', '.join(options)}."
        )
    cause = err.__cause__
    if isinstance(err, ConfigCompositionException) and isinstance(
        cause, (ConfigKeyError, ConfigAttributeError)
    ):
        parent = cause.parent_node
        known = [str(k) for k in parent if k != "hydra"] if isinstance(parent, DictConfig) else []
        path, _, key = (cause.full_key or str(cause.key)).rpartition(".")
        return GenlabError(
            f"{unknown(path, key, known, path or 'the top-level config')}. Keys that are not in "
            f"the config can only be added with +key=value, for objects that accept them."
        )
    if isinstance(err, OverrideParseException) and err.override not in str(err):
        return GenlabError(f"{err.override}: {_one_paragraph(str(err))}")
    if isinstance(err, (ConfigCompositionException, OverrideParseException, SearchPathException)):
        return GenlabError(_one_paragraph(str(err)))
    return None


@contextmanager
def reworded(conf_dir: Path) -> Iterator[None]:
    """While the block runs, ``hydra.main`` reports its composition errors as genlab's
    one-paragraph errors (``HYDRA_FULL_ERROR=1`` still shows the traceback, see `user_errors`)."""

    def rewrite(work: Callable[[], Any]) -> Any:
        with user_errors(), disk_errors(Path.cwd()):  # Hydra creates the run folder itself
            try:
                return work()
            except (HydraException, ValueError, FileExistsError, NotADirectoryError) as err:
                user_error = user_error_from_hydra(err, sys.argv[1:], conf_dir)
                if user_error is None:
                    raise
                raise user_error from err

    with private_api.hydra_errors_rewritten(rewrite):
        yield
