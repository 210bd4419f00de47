"""A full, read-only or forbidden output folder: one clear error instead of a traceback."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from genlab.errors import GenlabError

# What each error number means for a folder being written.
_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def write_error(err: BaseException) -> OSError | None:
    """The OSError of a failed write behind ``err`` (torch.save wraps it in a RuntimeError)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _REASONS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            return f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB free there"
    return "free space unknown"


@contextlib.contextmanager
def disk_errors(output_dir: Path, record: Callable[[str], None] | None = None) -> Iterator[None]:
    """Turn a failed write (full disk, read-only or forbidden folder) into a `GenlabError`
    naming the file and the free space. ``record(message)`` is then called to note the
    failure in the run directory where that can still be written."""
    try:
        yield
    except Exception as err:
        cause = write_error(err)
        if cause is None or isinstance(err, GenlabError):
            raise
        path = Path(cause.filename or output_dir)
        verb = "access" if cause.errno in (errno.EACCES, errno.EPERM) else "write"
        message = (
            f"Could not {verb} {str(path)!r}: {_REASONS[cause.errno]} "
            f"({_free_space(path.parent if cause.filename else path)}). Files already written "
            f"stay whole (if the run had saved a checkpoint, resume=last continues from it). "
            f"Free space or fix the folder's permissions, or use other folders: "
            f"hydra.run.dir=<folder> (or paths.log_dir) for runs, paths.cache_dir for the FID "
            f"classifiers, data.data_dir for the data."
        )
        if record is not None:
            with contextlib.suppress(OSError):
                record(message)
        raise GenlabError(message) from err
