"""Files written whole or not at all, whatever stops the writer (a crash, kill -9, a second writer)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from genlab.disk import write_error


def write_atomically(
    path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], None]
) -> None:
    """Write ``content`` (text, bytes, or a function that writes to a binary file) to ``path``.

    The bytes go to a hidden temporary file beside ``path``, named after this process, are
    synced to disk and renamed over ``path``: a reader sees the old file or the new one,
    never part of one, and two processes writing the same file never mix their bytes (the
    last rename wins). A rename within one folder is atomic; a copy from another file
    system would not be.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except Exception as err:
        failed = write_error(err)
        if failed is not None and failed.filename is None:  # a write into an open file names none
            failed.filename = str(path)
        raise
    finally:
        partial.unlink(missing_ok=True)  # only still there when the write failed
    # Make the rename itself durable.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
