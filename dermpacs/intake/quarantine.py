"""The quarantine: refused and unprocessable data sets, kept aside with the reason.

An admin looks here to see what a sender got wrong (or what a hostile peer tried). Each entry
is ``quarantine/<day>/<name>.dcm`` with ``<name>.json`` beside it: the C-STORE status, the
reason, the UIDs from the request and the header, the calling AE title and address, the time,
the size and the SHA-256 of the bytes. The JSON never holds patient data, and the names never
come from the sender (a hostile SOP Instance UID could be ``../../etc``).

The folder is bounded (``intake.quarantine_max_mb``): a peer that sends garbage without end
fills it to the bound, and then its data sets are refused without being kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dermpacs.durable import fsync_directory

logger = logging.getLogger(__name__)

QUARANTINE_DIRNAME = "quarantine"


@dataclass(frozen=True)
class QuarantineRecord:
    """Why a data set was set aside (written as the ``.json`` beside its bytes).

    ``stage`` is ``intake`` (refused by the listener, the sender got the status) or
    ``processing`` (accepted, then found unreadable by the worker; the job failed).
    """

    stage: str
    status: int | None
    reason: str
    sop_instance_uid: str
    sop_class_uid: str = ""
    transfer_syntax_uid: str = ""
    calling_ae_title: str = ""
    peer_address: str = ""
    job_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.status is not None:
            data["status_hex"] = f"0x{self.status:04X}"
        return data


class Quarantine:
    """``storage_root/quarantine``, holding at most ``max_bytes``.

    Parameters
    ----------
    storage_root
        The configured ``storage.root``.
    max_bytes
        The most the folder may hold (data set bytes); 0 keeps nothing.
    """

    def __init__(self, storage_root: Path, *, max_bytes: int) -> None:
        self.root = Path(storage_root) / QUARANTINE_DIRNAME
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._used: int | None = None  # measured on first use
        self._full_logged = False

    def used_bytes(self) -> int:
        """Bytes of data sets held now (measured once, then counted)."""
        with self._lock:
            return self._measure()

    def _measure(self) -> int:
        if self._used is None:
            self._used = sum(p.stat().st_size for p in self.root.glob("*/*.dcm") if p.is_file())
        return self._used

    def _reserve(self, size: int) -> bool:
        with self._lock:
            if self.max_bytes <= 0 or self._measure() + size > self.max_bytes:
                if not self._full_logged and self.max_bytes > 0:
                    logger.warning(
                        "quarantine full (intake.quarantine_max_mb = %d): refused data sets "
                        "are no longer kept",
                        self.max_bytes // 2**20,
                    )
                    self._full_logged = True
                return False
            self._used = (self._used or 0) + size
            return True

    def _release(self, size: int) -> None:
        with self._lock:
            self._used = max(0, (self._used or 0) - size)

    def _day_dir(self) -> Path:
        day = self.root / datetime.now(UTC).strftime("%Y%m%d")
        day.mkdir(parents=True, exist_ok=True)
        return day

    def _write_reason(self, target: Path, record: QuarantineRecord, data: bytes | None) -> None:
        meta = record.as_json()
        meta["quarantined_at"] = datetime.now(UTC).isoformat()
        meta["file"] = target.name
        if data is not None:
            meta["size"] = len(data)
            meta["sha256"] = hashlib.sha256(data).hexdigest()
        reason = target.with_suffix(".json")
        partial = reason.with_name(f".{reason.name}.part")
        with open(partial, "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, reason)

    def keep(self, data: bytes, record: QuarantineRecord) -> Path | None:
        """Keep ``data`` (as received) with ``record``; the path, or None when not kept.

        Never raises: a quarantine that cannot be written must not change the answer the
        sender gets. Nothing half-written stays (temporary names, then renames).
        """
        if not self._reserve(len(data)):
            return None
        token = f"{datetime.now(UTC):%H%M%S}-{uuid.uuid4().hex[:12]}"
        try:
            day = self._day_dir()
            target = day / f"{token}.dcm"
            partial = day / f".{token}.dcm.part"
            try:
                with open(partial, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(partial, target)
                self._write_reason(target, record, data)
                fsync_directory(day)
            finally:
                with contextlib.suppress(OSError):
                    partial.unlink()
        except OSError as exc:
            self._release(len(data))
            logger.warning("could not quarantine a refused data set: %s", exc.strerror or exc)
            return None
        return target

    def keep_file(self, source: Path, record: QuarantineRecord) -> Path | None:
        """Set aside a file already on the same file system (a spool file), by a hard link.

        The source stays where it is; the caller removes it once nothing refers to it. The
        path in the quarantine, or None when not kept.
        """
        try:
            size = source.stat().st_size
        except OSError:
            return None
        if not self._reserve(size):
            return None
        token = f"{datetime.now(UTC):%H%M%S}-{uuid.uuid4().hex[:12]}"
        try:
            day = self._day_dir()
            target = day / f"{token}.dcm"
            try:
                os.link(source, target)
            except OSError:  # another file system: copy
                data = source.read_bytes()
                partial = day / f".{token}.dcm.part"
                with open(partial, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(partial, target)
            with open(target, "rb") as handle:
                data = handle.read()
            self._write_reason(target, record, data)
            fsync_directory(day)
        except OSError as exc:
            self._release(size)
            logger.warning("could not quarantine %s: %s", source.name, exc.strerror or exc)
            return None
        return target

    def entries(self) -> list[tuple[Path, dict[str, Any]]]:
        """What the quarantine holds: each data set's path and its reason, oldest first."""
        found = []
        for reason in sorted(self.root.glob("*/*.json")):
            with contextlib.suppress(OSError, ValueError):
                found.append((reason.with_suffix(".dcm"), json.loads(reason.read_text())))
        return found
