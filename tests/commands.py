"""genlab's commands as a user runs them: the installed console scripts, in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def command_path(name: str) -> str:
    """The console script installed beside this interpreter, even when its environment is
    not activated."""
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"{name} is not installed: pip install -e '.[dev]'"
    return path


def command_env(data_dir: Path | None) -> dict[str, str]:
    """This process's environment, with GENLAB_DATA_DIR set to ``data_dir`` (unset for None)
    and without HYDRA_FULL_ERROR, so that errors print as users see them."""
    env = {k: v for k, v in os.environ.items() if k not in ("GENLAB_DATA_DIR", "HYDRA_FULL_ERROR")}
    if data_dir is not None:
        env["GENLAB_DATA_DIR"] = str(data_dir)
    return env


def run_command(
    name: str, *args: str, data_dir: Path | None, cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``name args...`` (``genlab-train``, ``genlab-eval`` or ``genlab-report``) to its end."""
    return subprocess.run(
        [command_path(name), *args],
        check=False,
        cwd=cwd,
        env=command_env(data_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def genlab_train(*args: str, data_dir: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    return run_command("genlab-train", *args, data_dir=data_dir, cwd=cwd)


def genlab_eval(*args: str, data_dir: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    return run_command("genlab-eval", *args, data_dir=data_dir, cwd=cwd)
