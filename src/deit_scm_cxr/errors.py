"""The one error every part of a run raises for a refused input."""

from __future__ import annotations

import errno
import os
import shutil
from typing import NoReturn

# A failed write that is the user's to fix: no space, quota or file-size allowance left, a read-only or
# foreign folder. Entry points say it in one line (exit status 2) instead of a traceback.
WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


class RunInputError(ValueError):
    """A mistake in what the user gave a run (flags, data folder, model folder, checkpoint). The command-line
    entry points print it in one line and exit with status 2, as argparse does; a library caller catches it."""


class RunWriteError(RuntimeError):
    """A run could not write what it must (a checkpoint, the model): a full disk, a quota, a file-size limit, a
    read-only folder. Said in one line with exit status 2 by the entry points; the message names the path."""


def free_mib(folder: str | os.PathLike[str]) -> float:
    """Free space on `folder`'s disk in MiB, for a `RunWriteError`'s message; NaN when the folder is gone (a
    message must not fail in its turn)."""
    try:
        return shutil.disk_usage(folder).free / 2**20
    except OSError:
        return float("nan")


def refuse(message: str) -> NoReturn:
    """Raise `RunInputError(message)`: the one way the run's modules reject an input."""
    raise RunInputError(message)


__all__ = ["WRITE_ERRORS", "RunInputError", "RunWriteError", "free_mib", "refuse"]
