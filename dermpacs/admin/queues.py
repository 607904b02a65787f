"""What waits in each queue: the broker's count, the job store's view, and who consumes it.

Two views of one queue, because each sees what the other cannot:

* the broker counts messages no worker has taken yet (Redis: the length of the queue's lists,
  one per priority step; the embedded broker: rows of its message table), and with Redis the
  messages workers hold unacknowledged (running, or waiting out a retry countdown);
* the job store knows which jobs wait for the stage and since when, also those whose message
  never reached the broker (it was down) or waits for a retry time.

Consumers come from Celery's remote control (``inspect().active_queues()``): the workers that
answer within ``admin.inspect_timeout``. The embedded broker cannot broadcast between
processes, so there they are unknown.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import func, select

from dermpacs.config import Settings
from dermpacs.jobs.models import Delivery, DeliveryState, Job, JobEvent, JobState, utc_now
from dermpacs.jobs.queue_control import QueueControlState, queue_controls
from dermpacs.jobs.store import JobStore

logger = logging.getLogger(__name__)

# The throughput shown beside each queue is averaged over this window.
RATE_WINDOW = timedelta(minutes=5)
# Reading the unacknowledged messages of Redis stops after this many (they are parsed).
_MAX_UNACKED_SCAN = 10_000


@dataclass(frozen=True)
class QueueStatus:
    """One Celery queue as an admin sees it.

    Attributes
    ----------
    name
        The Celery queue (``queues.<stage>.name``).
    stage
        ``inference`` or ``dispatch``.
    broker_depth
        Messages on the broker that no worker has taken; None when the broker did not answer.
    reserved
        Messages taken by workers and not yet acknowledged (Redis only; None elsewhere).
    waiting_jobs
        Jobs waiting for this stage in the job store (inference: received or queued;
        dispatch: results ready with a delivery due now).
    scheduled_jobs
        Dispatch only: jobs whose next delivery attempt is later (backing off).
    oldest_waiting_seconds
        How long the longest-waiting of ``waiting_jobs`` has waited; None when none waits.
    consumers
        Workers taking from the queue; None when they could not be asked.
    done_per_minute
        Jobs that left the stage per minute over the last five minutes.
    broker_error
        Why the broker could not be read, if it could not.
    paused
        An admin paused the queue (``dermpacs queues pause``); workers do not take from it.
    rate_limit
        The rate limit of the queue's task in each worker: the one an admin set, else the
        configured one; empty: none.
    """

    name: str
    stage: str
    broker_depth: int | None
    reserved: int | None
    waiting_jobs: int
    scheduled_jobs: int
    oldest_waiting_seconds: float | None
    consumers: list[str] | None
    done_per_minute: float
    broker_error: str | None = None
    paused: bool = False
    rate_limit: str = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _age(now: datetime, since: datetime | None) -> float | None:
    return None if since is None else max(0.0, (now - since).total_seconds())


def store_queue_view(store: JobStore, *, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """The job store's side of both stages: waiting, scheduled, oldest and throughput."""
    now = now or utc_now()
    since = now - RATE_WINDOW
    minutes = RATE_WINDOW.total_seconds() / 60.0
    with store.engine.connect() as conn:
        waiting, oldest = conn.execute(
            select(func.count(), func.min(Job.updated_at)).where(
                Job.state.in_([JobState.RECEIVED, JobState.QUEUED])
            )
        ).one()
        due = (
            select(
                Delivery.job_id.label("job_id"),
                func.min(Delivery.next_attempt_at).label("due_since"),
            )
            .join(Job, Job.id == Delivery.job_id)
            .where(Job.state == JobState.RESULTS_READY)
            .where(Delivery.state == DeliveryState.PENDING)
            .where(Delivery.next_attempt_at <= now)
            .group_by(Delivery.job_id)
            .subquery()
        )
        dispatch_waiting, dispatch_oldest = conn.execute(
            select(func.count(), func.min(due.c.due_since))
        ).one()
        results_ready = conn.execute(
            select(func.count()).where(Job.state == JobState.RESULTS_READY)
        ).scalar_one()
        left = dict(
            conn.execute(
                select(JobEvent.from_state, func.count())
                .where(JobEvent.at >= since)
                .where(JobEvent.from_state.in_([JobState.PROCESSING, JobState.RESULTS_READY]))
                .group_by(JobEvent.from_state)
            ).all()
        )
    return {
        "inference": {
            "waiting_jobs": int(waiting),
            "scheduled_jobs": 0,
            "oldest_waiting_seconds": _age(now, _as_utc(oldest)),
            "done_per_minute": left.get(JobState.PROCESSING, 0) / minutes,
        },
        "dispatch": {
            "waiting_jobs": int(dispatch_waiting),
            "scheduled_jobs": max(0, int(results_ready) - int(dispatch_waiting)),
            "oldest_waiting_seconds": _age(now, _as_utc(dispatch_oldest)),
            "done_per_minute": left.get(JobState.RESULTS_READY, 0) / minutes,
        },
    }


def _as_utc(value: Any) -> datetime | None:
    # An aggregate of a UTC column can come back naive (or as text from SQLite): stored in UTC.
    if value is None:
        return None
    if isinstance(value, str):  # SQLite aggregate over a TypeDecorator column
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


@contextmanager
def inspection_app(settings: Settings) -> Iterator[Celery]:
    """A Celery app of its own, configured like the workers', for looking at the broker.

    Not the workers' module-level app: its connection and producer pools outlive a change of
    configuration, and looking must not change what publishing uses.
    """
    from workers.app import celery_config

    app = Celery("dermpacs-admin", set_as_current=False)
    app.conf.update(celery_config(settings))
    try:
        yield app
    finally:
        app.close()


def broker_depths(settings: Settings, names: list[str]) -> tuple[dict[str, int], str | None]:
    """Messages waiting on the broker per queue, through kombu (Redis lists, SQL rows).

    Returns the depths and, when the broker could not be read, why (the depths are then empty).
    """
    from kombu.exceptions import ChannelError

    depths: dict[str, int] = {}
    try:
        with inspection_app(settings) as app, app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=settings.admin.echo_timeout)
            channel = connection.default_channel
            for name in names:
                try:
                    depths[name] = int(
                        channel.queue_declare(queue=name, passive=True).message_count
                    )
                except ChannelError:
                    # Redis has no key for an empty queue: a passive declare says "not found".
                    depths[name] = 0
                    channel = connection.default_channel
    except Exception as exc:
        return {}, f"{type(exc).__name__}: {exc}"
    return depths, None


def redis_reserved(settings: Settings, names: list[str]) -> dict[str, int] | None:
    """Unacknowledged messages per queue in Redis (kombu's ``unacked`` hash); None if not Redis.

    Each entry is ``[message, exchange, routing_key]``; dermpacs routes each queue by its own
    name, so the routing key names the queue. Redis is reached as the workers reach it: the
    password of ``broker.password_file`` and the ``broker.tls_*`` files.
    """
    if not settings.broker.url.startswith(("redis://", "rediss://", "unix://")):
        return None
    import redis

    from workers.app import broker_tls, broker_url

    counts = dict.fromkeys(names, 0)
    client = redis.Redis.from_url(
        broker_url(settings),
        socket_timeout=settings.admin.echo_timeout,
        **(broker_tls(settings) or {}),
    )
    try:
        for seen, (_, raw) in enumerate(client.hscan_iter("unacked", count=500)):
            if seen >= _MAX_UNACKED_SCAN:
                break
            try:
                _, exchange, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            for candidate in (routing_key, exchange):
                if candidate in counts:
                    counts[candidate] += 1
                    break
    finally:
        client.close()
    return counts


def broker_holds(settings: Settings, name: str) -> int | None:
    """Messages of queue ``name`` that Redis holds: waiting (every priority step) and taken
    but not yet acknowledged. None for the embedded broker or when Redis cannot be read.

    The listener's reconciler asks this to find ``queued`` jobs whose message is gone
    (:class:`dermpacs.jobs.publisher.PeriodicReconciler`).
    """
    if not settings.broker.url:
        return None
    depths, error = broker_depths(settings, [name])
    if error is not None:
        return None
    try:
        reserved = redis_reserved(settings, [name])
    except Exception:  # Redis unreadable: say nothing rather than zero
        return None
    return depths[name] + (reserved or {}).get(name, 0)


def queue_consumers(settings: Settings, names: list[str]) -> dict[str, list[str]] | None:
    """The workers consuming each queue, as they answer Celery's remote control.

    None for the embedded broker (it cannot broadcast between processes) or when the broker
    cannot be reached.
    """
    from workers.app import uses_embedded_broker

    if uses_embedded_broker(settings):
        return None
    try:
        with inspection_app(settings) as app, app.connection_for_write() as connection:
            answers = app.control.inspect(
                timeout=settings.admin.inspect_timeout, connection=connection
            ).active_queues()
    except Exception as exc:
        logger.warning("workers could not be asked for their queues: %s", exc)
        return None
    consumers: dict[str, list[str]] = {name: [] for name in names}
    for worker, queues in sorted((answers or {}).items()):
        for queue in queues or []:
            name = queue.get("name") if isinstance(queue, dict) else None
            if name in consumers:
                consumers[name].append(worker)
    return consumers


def _effective_rate_limit(configured: str, control: QueueControlState | None) -> str:
    if control is None or control.rate_limit is None:
        return configured
    return control.rate_limit


def inspect_queues(
    settings: Settings, store: JobStore, *, ask_workers: bool = True
) -> list[QueueStatus]:
    """Both queues as :class:`QueueStatus`, inference first.

    Parameters
    ----------
    ask_workers
        Ask the workers which queues they take (waits up to ``admin.inspect_timeout``).
    """
    stages = {"inference": settings.queues.inference, "dispatch": settings.queues.dispatch}
    names = [q.name for q in stages.values()]
    depths, broker_error = broker_depths(settings, names)
    reserved: dict[str, int] | None = None
    if broker_error is None:
        try:
            reserved = redis_reserved(settings, names)
        except Exception as exc:
            logger.warning("could not read Redis' unacknowledged messages: %s", exc)
    consumers = queue_consumers(settings, names) if ask_workers and broker_error is None else None
    view = store_queue_view(store)
    controls = queue_controls(store)
    return [
        QueueStatus(
            name=queue.name,
            stage=stage,
            broker_depth=depths.get(queue.name),
            reserved=None if reserved is None else reserved.get(queue.name, 0),
            consumers=None if consumers is None else consumers.get(queue.name, []),
            broker_error=broker_error,
            paused=queue.name in controls and controls[queue.name].paused,
            rate_limit=_effective_rate_limit(queue.rate_limit, controls.get(queue.name)),
            **view[stage],
        )
        for stage, queue in stages.items()
    ]
