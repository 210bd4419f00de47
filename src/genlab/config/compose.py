"""Where genlab's Hydra configs live, and composing them outside the command line."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from genlab.config.hydra_errors import user_error_from_hydra

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _find_conf_dir() -> Path:
    # A wheel carries the configs as genlab/conf; a source checkout (including
    # `pip install -e .`) keeps them at the repository's top level.
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"genlab's conf/ directory was not found next to {_PACKAGE_DIR}")


CONF_DIR = _find_conf_dir()


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose a config exactly as the command line would, for notebooks and tests.

    Values that only exist inside a Hydra run (``${hydra:...}``) stay
    unresolved; pass ``paths.output_dir=<dir>`` to give the run a directory.
    Composition errors are raised as `GenlabError`, worded as the command line words them.
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return compose(config_name=config_name, overrides=overrides or [])
        except (HydraException, ValueError) as err:
            user_error = user_error_from_hydra(err, overrides or [], CONF_DIR)
            if user_error is None:
                raise
            raise user_error from err
