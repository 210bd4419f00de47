"""genlab's commands as a user runs them, from the tests.

`run_command` runs the installed console script in a subprocess, as a shell would.
`run_commands` runs several command lines of one command in one fresh interpreter, one
after another, through the same entry point the console script calls: each gets its own
command line, environment, stdout, stderr and exit code, and together they pay the
interpreter's start-up (importing torch and Lightning) once instead of once each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# The entry point of each console script (pyproject.toml's [project.scripts]).
ENTRY_POINTS = {
    "genlab-train": "genlab.cli:train_command",
    "genlab-eval": "genlab.cli:eval_command",
    "genlab-report": "genlab.cli:report_command",
}


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


_DRIVER = """
import contextlib, importlib, io, json, os, sys, traceback
name, cases, results_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
module, _, function = ENTRY_POINTS[name].partition(":")
PRELUDE
entry_point = getattr(importlib.import_module(module), function)
results, environment = [], dict(os.environ)
for case in cases:
    os.environ.clear()
    os.environ.update(environment)
    os.environ.update(case.get("env", {}))
    for key in case.get("unset", []):
        os.environ.pop(key, None)
    sys.argv = [name, *case["args"]]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            entry_point()
        except SystemExit as stop:
            code = stop.code
        except BaseException:
            traceback.print_exc()
            code = "uncaught"
    read = case.get("read")  # a file to read right after the command, e.g. its metrics.json
    text = open(read).read() if read and os.path.exists(read) else None
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "read": text})
with open(results_file, "w") as f:
    json.dump(results, f)
"""


def run_commands(
    name: str, cases: list[dict[str, Any]], data_dir: Path, cwd: Path, prelude: str = ""
) -> list[dict[str, Any]]:
    """Run each case's command line of ``name`` in one fresh interpreter, in order.

    A case is ``{"args": [...]}``, optionally with ``env`` (variables to set),
    ``unset`` (variables to remove, e.g. ``GENLAB_DATA_DIR``) and ``read`` (a file
    to read as soon as the command ends). Each result holds ``code`` (the exit
    code: 0, a number, or ``"uncaught"`` for an exception that escaped),
    ``stdout``, ``stderr`` and ``read`` (that file's text, or None). ``prelude``
    is Python run first, e.g. a callback class a case names as ``__main__.<name>``.
    """
    handle, results = tempfile.mkstemp(prefix=".results-", suffix=".json", dir=cwd)
    os.close(handle)
    out = Path(results)
    driver = f"ENTRY_POINTS = {ENTRY_POINTS!r}\n" + _DRIVER.replace("PRELUDE", prelude)
    done = subprocess.run(
        [sys.executable, "-c", driver, name, json.dumps(cases), str(out)],
        check=False,
        cwd=cwd,
        env=command_env(data_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())
