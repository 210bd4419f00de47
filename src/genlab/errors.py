"""User-facing errors: one clear paragraph instead of a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class GenlabError(Exception):
    """A problem the user can fix (bad input, missing data); its message says how."""


class FolderTaken(GenlabError):
    """A run's folder holds another run's results, or another genlab command works in it."""


class TrainingDiverged(GenlabError):
    """A training loss became NaN or infinite; the run stops without saving the broken weights."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM that ends a command where it is (see `genlab.interrupts`).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` (a sweep
    recording a failed job, Lightning's error handling) mistakes it for a failure.
    """

    def __init__(self, signum: int, phase: str):
        super().__init__(signum, phase)
        self.signum = signum
        self.phase = phase

    def __str__(self) -> str:
        return f"{signal.Signals(self.signum).name} during {self.phase}"


@contextlib.contextmanager
def signals_handled(signums: tuple[int, ...], handler: Any) -> Iterator[None]:
    """Route ``signums`` to ``handler`` while the block runs, then restore the handlers that
    were there. Only the main thread may handle signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            if old is not None:  # None: installed from C, which Python cannot restore
                signal.signal(signum, old)


def sigterm_raises(phase: str) -> contextlib.AbstractContextManager[None]:
    """While the block runs, SIGTERM raises `Interrupted` (so ``finally`` blocks and locks
    are released) instead of killing the process where it stands."""

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(signum, phase)

    return signals_handled((signal.SIGTERM,), stop)


def exit_code(signal_name: str) -> int:
    """The shell's exit code for a process stopped by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signal.Signals[signal_name]


def find_user_error(err: BaseException) -> GenlabError | None:
    """The `GenlabError` behind ``err``, if any.

    ``hydra.utils.instantiate`` wraps errors raised while building an object
    (e.g. a bad ``model.net.activation``) in an ``InstantiationException``.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, GenlabError):
            return seen
        seen = seen.__cause__
    return None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `GenlabError` into its message on stderr and exit code 1.

    With HYDRA_FULL_ERROR=1 the exception propagates unchanged, traceback
    included, for debugging. Other exceptions are bugs and keep their traceback.
    """
    try:
        yield
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {user_error}", file=sys.stderr)
        raise SystemExit(1) from None
