"""Durable files on the local disk, for every stage that writes them.

A stage writes a temporary file, fsyncs it and renames it into place; the rename itself is
durable only once the folder that holds the new name is fsync'd too. The spool, the
quarantine, the result objects and folder destinations all rely on it, so it lives here, below
intake and dispatch, which never import each other's internals.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to the disk.

    Raises
    ------
    OSError
        The folder cannot be opened or flushed.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
