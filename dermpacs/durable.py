"""Durable files on the local disk, for every stage that writes them.

A stage writes a temporary file, fsyncs it and renames it into place; the rename itself is
durable only once the folder that holds the new name is fsync'd too. The spool, the
quarantine, the result objects and folder destinations all rely on it, so it lives here, below
intake and dispatch, which never import each other's internals.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any


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


def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to the disk.

    It does not wait and promises nothing: durability still comes from the ``fsync`` that
    follows. Started while the rest of a file is still arriving, it leaves that ``fsync``
    only the tail to wait for (a 3.3 MB photo: 15 ms to 1-2 ms here, docs/benchmarks.md).
    Where ``sync_file_range`` does not exist, or fails, this does nothing.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
