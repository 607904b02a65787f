"""Change how the queues flow while the workers run: Celery's remote control, via dermpacs.

* pause / resume a queue: every worker stops (``cancel_consumer``) or starts again
  (``add_consumer``) taking messages from it; tasks already running finish, messages wait on
  the broker. Recorded in the job store, so that workers that start later stay off a paused
  queue (``workers.app`` applies it when a worker starts and when it is ready).
* rate: the queue's task gets a new Celery rate limit in every worker (``rate_limit``; per
  worker, like the configured ``queues.<stage>.rate_limit``), also recorded.
* pool grow / shrink: every worker (or the named ones) adds or stops pool processes
  (``pool_grow`` / ``pool_shrink``); not recorded: a worker that starts gets its configured
  concurrency.

Each command returns every worker's reply. Remote control is a broadcast on the broker, which
the embedded broker cannot carry between processes: there these commands refuse with
:class:`QueueControlUnavailable`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dermpacs.config import RATE_LIMIT_PATTERN, ConfigError, Settings
from dermpacs.jobs.queue_control import record_paused, record_rate_limit
from dermpacs.jobs.store import JobStore

logger = logging.getLogger(__name__)

NO_LIMIT = ("none", "0", "")


class QueueControlUnavailable(RuntimeError):
    """Remote control cannot reach the workers with this configuration."""


@dataclass(frozen=True)
class ControlResult:
    """What a queue control command did.

    ``replies`` maps each worker that answered to its reply (``{"ok": ...}`` or
    ``{"error": ...}``); ``recorded`` says whether the change was kept in the job store for
    workers that start later.
    """

    action: str
    target: str
    value: str | int | None
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    recorded: bool = False

    @property
    def answered(self) -> bool:
        return bool(self.replies)

    @property
    def errors(self) -> dict[str, str]:
        return {w: str(r["error"]) for w, r in self.replies.items() if "error" in r}

    def as_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "target": self.target,
            "value": self.value,
            "recorded": self.recorded,
            "replies": self.replies,
        }


def _check_broker(settings: Settings) -> None:
    from workers.app import uses_embedded_broker

    if uses_embedded_broker(settings):
        raise QueueControlUnavailable(
            "queue control needs Redis (broker.url): the embedded broker cannot broadcast to "
            "workers in other processes. Stop the worker (dermpacs serve) instead, or set "
            "queues.<stage>.rate_limit / concurrency and restart it."
        )


def _broadcast(
    settings: Settings, command: str, arguments: dict[str, Any], destination: list[str] | None
) -> dict[str, dict[str, Any]]:
    from dermpacs.admin.queues import inspection_app

    with inspection_app(settings) as app, app.connection_for_write() as connection:
        answers = app.control.broadcast(
            command,
            arguments=arguments,
            destination=destination or None,
            reply=True,
            timeout=settings.admin.inspect_timeout,
            connection=connection,
        )
    replies: dict[str, dict[str, Any]] = {}
    for answer in answers or []:
        for worker, reply in answer.items():
            replies[worker] = reply if isinstance(reply, dict) else {"ok": reply}
    return replies


def _queue_name(settings: Settings, queue: str) -> str:
    """A queue name, also from its stage name (``inference``, ``dispatch``)."""
    from workers.app import queue_task

    stages = {"inference": settings.queues.inference, "dispatch": settings.queues.dispatch}
    name = stages[queue].name if queue in stages else queue
    queue_task(settings, name)  # ConfigError for an unknown queue
    return name


def set_paused(
    settings: Settings,
    store: JobStore,
    queue: str,
    paused: bool,
    *,
    actor: str,
    destination: list[str] | None = None,
) -> ControlResult:
    """Pause (or resume) ``queue`` in every worker and remember it for workers to come.

    Raises
    ------
    QueueControlUnavailable
        The embedded broker.
    ConfigError
        No such queue.
    """
    name = _queue_name(settings, queue)
    _check_broker(settings)
    record_paused(store, name, paused, actor=actor)
    if paused:
        replies = _broadcast(settings, "cancel_consumer", {"queue": name}, destination)
    else:
        replies = _broadcast(settings, "add_consumer", {"queue": name}, destination)
    logger.info(
        "queue %s %s by %s: %d worker(s) answered",
        name,
        "paused" if paused else "resumed",
        actor,
        len(replies),
    )
    return ControlResult(
        "pause" if paused else "resume", name, None, replies=replies, recorded=True
    )


def set_rate_limit(
    settings: Settings,
    store: JobStore,
    queue: str,
    limit: str,
    *,
    actor: str,
    destination: list[str] | None = None,
) -> ControlResult:
    """Give ``queue``'s task the rate limit ``limit`` (``"10/m"``; ``none`` or 0: no limit)
    in every worker, and remember it for workers to come.

    Raises
    ------
    QueueControlUnavailable
        The embedded broker.
    ConfigError
        No such queue, or ``limit`` is not a Celery rate limit.
    """
    from workers.app import queue_task

    name = _queue_name(settings, queue)
    _check_broker(settings)
    limit = limit.strip().lower()
    if limit in NO_LIMIT:
        limit = ""
    elif not RATE_LIMIT_PATTERN.match(limit):
        raise ConfigError(
            f"{limit!r} is not a rate limit: a number of tasks per second, or per s, m or h "
            '("10/m"), or none'
        )
    record_rate_limit(store, name, limit, actor=actor)
    replies = _broadcast(
        settings,
        "rate_limit",
        {"task_name": queue_task(settings, name), "rate_limit": limit or None},
        destination,
    )
    logger.info(
        "queue %s rate limit %s by %s: %d worker(s) answered",
        name,
        limit or "none",
        actor,
        len(replies),
    )
    return ControlResult("rate", name, limit or "none", replies=replies, recorded=True)


def resize_pool(
    settings: Settings, *, grow: bool, processes: int, destination: list[str] | None = None
) -> ControlResult:
    """Add (``grow``) or stop ``processes`` pool processes in every worker (or the named).

    Raises
    ------
    QueueControlUnavailable
        The embedded broker.
    ConfigError
        ``processes`` is not positive.
    """
    _check_broker(settings)
    if processes < 1:
        raise ConfigError(f"pool: {processes} processes; give 1 or more")
    command = "pool_grow" if grow else "pool_shrink"
    replies = _broadcast(settings, command, {"n": processes}, destination)
    logger.info("%s %d: %d worker(s) answered", command, processes, len(replies))
    return ControlResult(
        "grow" if grow else "shrink", "pool", processes, replies=replies, recorded=False
    )
