"""Refused C-STOREs, kept in the job store's database so that the admin page and ``/metrics``
can count them from any host.

A refused photograph never becomes a job, so the job store alone cannot say how many were
refused nor why. :class:`RefusalLog` adds one small table (``intake_refusal``) beside the job
tables; the listener hands each refusal to :meth:`RefusalLog.record`, which returns at once and
writes in a background thread, so a slow or absent database never holds a C-STORE response.

The intake service wires it: ``Listener(..., on_refused=refusal_log.record)``, and starts and
stops it with the listener.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, Integer, String, Text, func, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dermpacs.jobs.models import AE_LENGTH, UID_LENGTH, UTCDateTime, utc_now
from dermpacs.jobs.schema import upgrade_schema

logger = logging.getLogger(__name__)

# C-STORE statuses the listener answers with when it refuses (PS3.4 B.2.3), by name.
REFUSAL_STATUS_NAMES = {
    0x0122: "sop_class_not_supported",
    0xA700: "out_of_resources",
    0xA900: "data_set_does_not_match_sop_class",
    0xC000: "cannot_understand",
}
_REASON_LENGTH = 256
_STOP = object()


def status_name(status: int) -> str:
    """A label for a refusal status (``out_of_resources``), or its hex code when unknown."""
    return REFUSAL_STATUS_NAMES.get(status, f"status_{status:04x}")


class RefusalBase(DeclarativeBase):
    """Declarative base of the admin's own table (kept apart from the job tables)."""


class IntakeRefusal(RefusalBase):
    """One C-STORE the listener refused: when, with which status, why and from whom."""

    __tablename__ = "intake_refusal"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    calling_ae_title: Mapped[str] = mapped_column(String(AE_LENGTH))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))


@dataclass(frozen=True)
class RefusalRecord:
    """A refusal as the admin page lists it."""

    at: datetime
    status: int
    status_name: str
    reason: str
    calling_ae_title: str
    sop_instance_uid: str


class RefusalLog:
    """Record refused C-STOREs and count them.

    Parameters
    ----------
    engine
        The job store's engine (``JobStore.engine``).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._schema_ready = False
        self._pending: queue.Queue[object] = queue.Queue(maxsize=10_000)
        self._thread: threading.Thread | None = None

    def _ensure_schema(self) -> None:
        # Created on first use, not at construction: the admin page starts while the
        # database is still down, and /readyz says so.
        if not self._schema_ready:
            # Created, or upgraded as the job store's tables are (dermpacs.jobs.schema).
            upgrade_schema(self.engine, RefusalBase.metadata)
            self._schema_ready = True

    # -- writing (the listener) --------------------------------------------------------------

    def start(self) -> RefusalLog:
        """Write recorded refusals in a background thread from now on."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="dermpacs-refusal-log", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Write what was recorded, then stop the thread."""
        if self._thread is not None:
            self._pending.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def record(
        self, status: int, reason: str, *, calling_ae_title: str, sop_instance_uid: str
    ) -> None:
        """Note one refusal; never blocks and never raises (a full queue drops it)."""
        row = {
            "at": utc_now(),
            "status": int(status),
            "reason": str(reason)[:_REASON_LENGTH],
            "calling_ae_title": str(calling_ae_title)[:AE_LENGTH],
            "sop_instance_uid": str(sop_instance_uid)[:UID_LENGTH],
        }
        if self._thread is None:
            self.write([row])
            return
        try:
            self._pending.put_nowait(row)
        except queue.Full:
            logger.warning("refusal log full; a refusal was not recorded")

    def write(self, rows: list[dict[str, object]]) -> bool:
        """Insert ``rows`` now; False (and a log line) when the database refuses."""
        try:
            self._ensure_schema()
            with self.engine.begin() as conn:
                conn.execute(insert(IntakeRefusal), rows)
        except Exception as exc:
            logger.warning("could not record %d refusal(s): %s", len(rows), exc)
            return False
        return True

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._pending.get()]
            while len(batch) < 256:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            stopping = any(item is _STOP for item in batch)
            rows = [item for item in batch if isinstance(item, dict)]
            if rows:
                self.write(rows)

    # -- reading (the admin page, /metrics) ---------------------------------------------------

    def counts_by_status(self) -> dict[int, int]:
        """How many refusals there were, per C-STORE status."""
        self._ensure_schema()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(IntakeRefusal.status, func.count()).group_by(IntakeRefusal.status)
            ).all()
        return {int(status): int(count) for status, count in rows}

    def recent(self, limit: int = 20) -> list[RefusalRecord]:
        """The latest refusals, newest first."""
        self._ensure_schema()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(IntakeRefusal).order_by(IntakeRefusal.id.desc()).limit(limit)
            ).all()
        return [
            RefusalRecord(
                at=row.at,
                status=row.status,
                status_name=status_name(row.status),
                reason=row.reason,
                calling_ae_title=row.calling_ae_title,
                sop_instance_uid=row.sop_instance_uid,
            )
            for row in rows
        ]
