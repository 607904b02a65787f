"""The spool: received bytes on disk before the C-STORE is answered.

Each instance is written to a file in the incoming folder as its bytes arrive, fsync'd,
renamed into place and its folder fsync'd, so that after a crash a spool file is either
complete or absent. The bytes are the
ones the sender sent (file meta information added), never re-encoded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dermpacs.durable import fsync_directory, start_writeback

SPOOL_DIRNAME = "spool"
_INCOMING = ".incoming"


class SpoolError(OSError):
    """The spool cannot take the instance (disk full, below the watermark, I/O error)."""


class SpoolFullError(SpoolError):
    """Free space is below the watermark (``storage.min_free_mb``): nothing was written."""

    def __init__(self, free_bytes: int, min_free_bytes: int) -> None:
        super().__init__(
            f"free space {free_bytes // 2**20} MiB below storage.min_free_mb "
            f"({min_free_bytes // 2**20} MiB)"
        )
        self.free_bytes = free_bytes
        self.min_free_bytes = min_free_bytes


class Spool:
    """Durable storage of received instances under ``storage_root/spool``.

    Parameters
    ----------
    storage_root
        The configured ``storage.root``.
    min_free_bytes
        Refuse to write when the file system would be left with less free space than this;
        0 turns the check off (a full disk still refuses, when the write fails).
    """

    def __init__(self, storage_root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = Path(storage_root) / SPOOL_DIRNAME
        self.min_free_bytes = min_free_bytes
        self._incoming = self.root / _INCOMING
        self._incoming.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()

    def free_bytes(self) -> int:
        """Free space on the spool's file system."""
        return shutil.disk_usage(self.root).free

    def has_room_for(self, size: int) -> bool:
        """Whether writing ``size`` bytes keeps the watermark."""
        return self.free_bytes() - size >= self.min_free_bytes

    def _day_dir(self) -> Path:
        day = self.root / datetime.now(UTC).strftime("%Y%m%d")
        if day not in self._known_dirs:
            created = not day.exists()
            day.mkdir(parents=True, exist_ok=True)
            if created:
                fsync_directory(self.root)  # the new folder's own entry
            self._known_dirs.add(day)
        return day

    def check_room(self, size: int = 0) -> None:
        """Raise :class:`SpoolFullError` when ``size`` more bytes would cross the watermark."""
        if self.min_free_bytes > 0:  # 0: no watermark, only the disk's own limit
            free = self.free_bytes()
            if free - size < self.min_free_bytes:
                raise SpoolFullError(free, self.min_free_bytes)

    def open_incoming(self, expected_size: int = 0) -> IncomingFile:
        """A new file in the spool's incoming folder, to be written as the bytes arrive.

        ``expected_size``, when known, is checked against the watermark now; the file's
        final size is checked again when it is committed.

        Raises
        ------
        SpoolFullError
            Free space is already below the watermark.
        SpoolError
            The file cannot be created.
        """
        self.check_room(expected_size)
        return IncomingFile(self, self._incoming / f"{uuid.uuid4().hex[:12]}.part")

    def _commit(self, incoming: IncomingFile, sop_instance_uid: str) -> Path:
        """Rename a complete, fsync'd incoming file into today's folder, durably."""
        day = self._day_dir()
        final = day / f"{sop_instance_uid}.{incoming.path.stem}.dcm"
        os.replace(incoming.path, final)
        try:
            fsync_directory(day)
        except OSError:
            final.unlink(missing_ok=True)  # not durable: the C-STORE is refused
            raise
        return final

    def spool_received_instance(self, encoded: bytes, sop_instance_uid: str) -> Path:
        """Write ``encoded`` durably and return its path.

        The name holds the SOP Instance UID and a random suffix, so that two concurrent
        receptions of one instance never overwrite each other.

        Raises
        ------
        SpoolFullError
            Writing would leave less free space than the watermark (nothing is written).
        SpoolError
            The write failed, a full disk included (nothing is left behind).
        """
        incoming = self.open_incoming(len(encoded))
        incoming.write(encoded)
        return incoming.commit(sop_instance_uid)

    def files_since(self, since: datetime | None) -> list[Path]:
        """Spooled instances written at or after ``since`` (all of them for None), oldest first.

        Only the day folders that can hold such files are listed.
        """
        first_day = "" if since is None else (since - timedelta(days=1)).strftime("%Y%m%d")
        cutoff = 0.0 if since is None else since.timestamp()
        found: list[tuple[float, Path]] = []
        for day in sorted(self.root.iterdir()):
            if day.name == _INCOMING or not day.is_dir() or day.name < first_day:
                continue
            for path in day.glob("*.dcm"):
                with contextlib.suppress(FileNotFoundError):
                    modified = path.stat().st_mtime
                    if modified >= cutoff:
                        found.append((modified, path))
        return [path for _, path in sorted(found)]

    def discard(self, path: str | Path) -> None:
        """Remove a spool file that turned out not to be needed (a duplicate)."""
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()

    def clear_incoming(self, *, older_than: float = 600.0) -> int:
        """Remove partial files left by a crash; returns how many. Called at start-up.

        Only files older than ``older_than`` seconds go, so that a listener starting beside
        another one on shared storage does not remove a file that one is writing.
        """
        removed = 0
        cutoff = datetime.now(UTC).timestamp() - older_than
        for partial in self._incoming.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if partial.stat().st_mtime < cutoff:
                    partial.unlink()
                    removed += 1
        return removed


def _write_failed(exc: OSError) -> SpoolError:
    return SpoolError(f"spool write failed: {exc.strerror or exc}")


class IncomingFile:
    """A spool file written while its bytes arrive, committed once they are all there.

    Each :meth:`write` goes to the file at once, and every :attr:`WRITEBACK_STEP` bytes the
    kernel is asked to start writing them to the disk (:func:`start_writeback`), so that the
    ``fsync`` in :meth:`commit` waits only for the last part: for a 12-MP photo arriving
    over 15 ms, that ``fsync`` and the rename took 1-2 ms instead of 15 here
    (docs/benchmarks.md). Until :meth:`commit`, the file lies in the incoming folder, which
    start-up clears; :meth:`discard` removes it at once.

    A failed write keeps the error (:attr:`error`), removes the file and ignores what comes
    after, so that the sender's remaining bytes are still read and the C-STORE is answered
    with a status instead of a broken association.
    """

    WRITEBACK_STEP = 512 * 1024

    def __init__(self, spool: Spool, path: Path) -> None:
        self.spool = spool
        self.path = path
        self.size = 0
        self.error: SpoolError | None = None
        self._flushed = 0  # bytes whose write-back has been started
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise _write_failed(exc) from exc

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; returns its length (failures are kept in :attr:`error`)."""
        if self._fd is None:
            return len(data)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self._fail(exc)
            return len(data)
        self.size += len(data)
        if self.size - self._flushed >= self.WRITEBACK_STEP:
            start_writeback(self._fd, self._flushed, self.size - self._flushed)
            self._flushed = self.size
        return len(data)

    def _fail(self, exc: OSError) -> None:
        self.error = _write_failed(exc)
        self.discard()

    def commit(self, sop_instance_uid: str) -> Path:
        """fsync, rename into today's folder and fsync that folder; returns the final path.

        Raises
        ------
        SpoolFullError
            The written file leaves less free space than the watermark (the file is removed).
        SpoolError
            A write failed (before or now); nothing is left behind.
        """
        if self.error is not None:
            raise self.error
        if self._fd is None:
            raise SpoolError("spool file already committed or discarded")
        try:
            os.fsync(self._fd)
            self.spool.check_room()
            final = self.spool._commit(self, sop_instance_uid)
        except SpoolFullError:
            self.discard()
            raise
        except OSError as exc:
            self._fail(exc)
            assert self.error is not None
            raise self.error from exc
        self._close()
        return final

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Close and remove the file, unless it was committed or discarded before."""
        if self._fd is not None:
            self._close()
            with contextlib.suppress(OSError):
                self.path.unlink()
