"""The spool: received bytes on disk before the C-STORE is answered.

Each instance is written to a temporary file, fsync'd, renamed into place and its folder
fsync'd, so that after a crash a spool file is either complete or absent. The bytes are the
ones the sender sent (file meta information added), never re-encoded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dermpacs.durable import fsync_directory

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
        if self.min_free_bytes > 0:  # 0: no watermark, only the disk's own limit
            free = self.free_bytes()
            if free - len(encoded) < self.min_free_bytes:
                raise SpoolFullError(free, self.min_free_bytes)
        token = uuid.uuid4().hex[:12]
        partial = self._incoming / f"{token}.part"
        try:
            with open(partial, "wb") as handle:
                handle.write(encoded)
                handle.flush()
                os.fsync(handle.fileno())
            day = self._day_dir()
            final = day / f"{sop_instance_uid}.{token}.dcm"
            os.replace(partial, final)
            fsync_directory(day)
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise SpoolError(f"spool write failed: {exc.strerror or exc}") from exc
        return final

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
