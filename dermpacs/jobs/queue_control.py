"""What admins changed on the queues while they run: paused queues and rate limits.

``dermpacs queues pause|resume|rate`` (and the admin page) tell the running workers through
Celery's remote control, and record the change here, so that a worker that starts later
(or restarts) applies it too (``workers.app`` reads it when a worker starts and when it is
ready). Pool sizes are not recorded: a worker that starts gets its configured concurrency.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from dermpacs.jobs.models import QueueControl, utc_now
from dermpacs.jobs.store import JobStore


@dataclass(frozen=True)
class QueueControlState:
    """One queue's recorded changes. ``rate_limit`` None: the configured one applies."""

    queue: str
    paused: bool
    rate_limit: str | None
    updated_at: datetime
    actor: str


def queue_controls(store: JobStore) -> dict[str, QueueControlState]:
    """The recorded state of every queue that an admin changed, by queue name."""
    with store.engine.connect() as connection:
        rows = connection.execute(select(QueueControl)).all()
    return {
        row.queue: QueueControlState(
            queue=row.queue,
            paused=bool(row.paused),
            rate_limit=row.rate_limit,
            updated_at=row.updated_at,
            actor=row.actor,
        )
        for row in rows
    }


def paused_queues(store: JobStore) -> set[str]:
    """Names of the queues recorded as paused."""
    return {name for name, state in queue_controls(store).items() if state.paused}


def _change(store: JobStore, queue: str, actor: str, **values: object) -> None:
    with Session(store.engine) as session:
        row = session.execute(
            select(QueueControl).where(QueueControl.queue == queue).with_for_update()
        ).scalar()
        if row is None:
            row = QueueControl(queue=queue, paused=False, rate_limit=None)
            session.add(row)
        for key, value in values.items():
            setattr(row, key, value)
        row.updated_at = utc_now()
        row.actor = actor
        session.commit()


def record_paused(store: JobStore, queue: str, paused: bool, *, actor: str) -> None:
    """Remember that ``queue`` is paused (or no longer)."""
    _change(store, queue, actor, paused=paused)


def record_rate_limit(store: JobStore, queue: str, rate_limit: str | None, *, actor: str) -> None:
    """Remember ``queue``'s rate limit (``""``: none; None: back to the configured one)."""
    _change(store, queue, actor, rate_limit=rate_limit)
