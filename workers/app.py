"""The Celery app, configured from the dermpacs settings.

Queues, routes, time limits, rate limits, priorities and the broker come from the
configuration (``[broker]``, ``[queues]``); each message carries the broker priority of its
job's level (chosen at intake), and workers apply the pauses and rate limits that admins
recorded (:mod:`dermpacs.jobs.queue_control`) when they start. Messages are JSON and carry
a job id only, and a worker refuses any other content type (a pickled message is never
unpickled). Tasks are acknowledged late and rejected when their worker dies, so Redis
redelivers them; a worker takes one message at a time. With ``broker.url`` empty the
embedded broker (a SQLite file under ``storage.root``) is used, so that ``dermpacs serve``
needs no Redis. The Redis password comes from ``broker.password_file`` (or the URL in the
environment), TLS from a ``rediss://`` URL with the ``broker.tls_*`` files.

Call :func:`configure` with the settings before using the app (the ``dermpacs`` commands do).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from celery import Celery, Task, signals
from kombu import Exchange, Queue

from dermpacs.config import ConfigError, Settings, load_settings, read_secret_file
from dermpacs.jobs.outcome import StageOutcome
from dermpacs.jobs.queue_control import QueueControlState, queue_controls

logger = logging.getLogger(__name__)

PROCESS_TASK = "dermpacs.process_job"
DISPATCH_TASK = "dermpacs.deliver_job"
EMBEDDED_BROKER_FILE = "broker.sqlite3"
# Publishing must not hold the listener up when the broker is down: a few quick tries, then
# the job stays ``received`` and the reconciler publishes it later.
PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 1.0,
}

app = Celery("dermpacs", include=["workers.tasks"])
_settings: Settings | None = None


def embedded_broker_url(settings: Settings) -> str:
    """The SQLite URL of the embedded broker under ``storage.root``."""
    path = (Path(settings.storage.root) / EMBEDDED_BROKER_FILE).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def uses_embedded_broker(settings: Settings) -> bool:
    """Whether ``broker.url`` is empty (the embedded broker)."""
    return not settings.broker.url


def broker_url(settings: Settings) -> str:
    """``broker.url`` with the password of ``broker.password_file`` put in (URL-quoted).

    Raises
    ------
    ConfigError
        The password file cannot be read.
    """
    url = settings.broker.url
    if not url or not settings.broker.password_file:
        return url
    password = read_secret_file(settings.broker.password_file, key="broker.password_file")
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{quote(parts.username or '', safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def broker_tls(settings: Settings) -> dict[str, Any] | None:
    """redis-py TLS options for a ``rediss://`` broker (certificate and host name checked)."""
    if not settings.broker.url.startswith("rediss://"):
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    broker = settings.broker
    for option, value in (
        ("ssl_ca_certs", broker.tls_ca_certificates),
        ("ssl_certfile", broker.tls_certificate),
        ("ssl_keyfile", broker.tls_private_key),
    ):
        if value:
            options[option] = value
    return options


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings``.

    Raises
    ------
    ConfigError
        The broker's visibility timeout is not longer than the longest a task can be held
        (time limit plus the longest retry delay): Redis would then deliver it twice.
    """
    inference, dispatch = settings.queues.inference, settings.queues.dispatch
    if inference.name == dispatch.name:
        raise ConfigError("queues.dispatch.name: must differ from queues.inference.name")
    # A task may be held as long as its time limit plus the longest countdown a retry asks
    # for: a retry delay, or the rest of another worker's lease.
    longest_hold = max(
        q.time_limit + max(q.retry_delay_max, settings.jobs.lease_timeout)
        for q in (inference, dispatch)
    )
    if settings.broker.visibility_timeout <= longest_hold:
        raise ConfigError(
            f"broker.visibility_timeout: {settings.broker.visibility_timeout} s must be longer "
            f"than any task's time_limit + max(retry_delay_max, jobs.lease_timeout) "
            f"({longest_hold:.0f} s)"
        )
    config: dict[str, Any] = {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "result_backend": None,
        # Each queue on its own direct exchange and routing key, so that a task published to
        # one queue can never land in the other.
        "task_queues": [
            Queue(q.name, Exchange(q.name, type="direct"), routing_key=q.name)
            for q in (inference, dispatch)
        ],
        "task_default_queue": inference.name,
        "task_routes": {
            PROCESS_TASK: {"queue": inference.name},
            DISPATCH_TASK: {"queue": dispatch.name},
        },
        "task_annotations": {
            PROCESS_TASK: {
                "time_limit": inference.time_limit,
                "rate_limit": inference.rate_limit or None,
            },
            DISPATCH_TASK: {
                "time_limit": dispatch.time_limit,
                "rate_limit": dispatch.rate_limit or None,
            },
        },
        # A message published without a priority (by another client) waits like a job of
        # the default level; kombu's transports would otherwise serve it first (priority 0).
        "task_default_priority": settings.queues.broker_priority(settings.queues.default_priority),
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 4.0,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "enable_utc": True,
    }
    if uses_embedded_broker(settings):
        config["broker_url"] = embedded_broker_url(settings)
        config["broker_transport"] = "workers.embedded:Transport"
        config["broker_transport_options"] = {}
    else:
        visibility = settings.broker.visibility_timeout
        config["broker_url"] = broker_url(settings)
        config["broker_transport"] = None
        config["broker_transport_options"] = {
            "visibility_timeout": visibility,
            # Look for messages whose worker died (unacknowledged past the visibility timeout)
            # a few times per timeout, not once per 100 s as kombu does by default.
            "unacked_restore_interval": max(1, min(60, visibility // 4)),
            "unacked_restore_throttle": 1,
            # kombu emulates priorities on Redis with one list per step; a worker's BRPOP
            # names the lists step by step (the lowest step of every queue first), so a LOWER
            # number is served first whatever queue_order_strategy says. One step per
            # configured level, so that no two levels share a list. queue_order_strategy
            # stays round robin: "priority" would let inference starve dispatch in a worker
            # that takes both.
            "priority_steps": sorted(set(settings.queues.priorities.values())),
        }
        config["broker_use_ssl"] = broker_tls(settings)
    return config


def configure(settings: Settings) -> Celery:
    """Configure the app from ``settings`` and remember them for the tasks."""
    global _settings
    _settings = settings
    app.conf.update(celery_config(settings))
    # Celery keeps its connection and producer pools across a configuration change, so a
    # process that is configured again (a command after a test, the admin page) would go on
    # publishing to the previous broker. Forget them; they are looked up again from app.conf.
    # Not force_close_all(): the pools are kombu's, shared by every app on the same broker URL.
    app._pool = None
    app.amqp._producer_pool = None
    return app


def current_settings() -> Settings:
    """The settings the app was configured with (loaded from ``$DERMPACS_CONFIG`` if none)."""
    if _settings is None:
        configure(load_settings())
    assert _settings is not None
    return _settings


def job_broker_priority(settings: Settings, job_id: int, level: str | None = None) -> int:
    """The broker priority of ``level``, or of the level on the job's row when None.

    The job store is the source of truth for the level, so that every publication of a job
    (by the listener, the reconciler, an admin retry, the worker for its delivery) carries
    the priority chosen at intake.
    """
    if level is None:
        from dermpacs.processing import shared_job_store

        level = shared_job_store(settings).priorities([job_id]).get(int(job_id))
    return settings.queues.broker_priority(level or settings.queues.default_priority)


def publish_processing(
    job_id: int, *, countdown: float | None = None, level: str | None = None
) -> None:
    """Put a processing task for ``job_id`` on the inference queue, at its priority."""
    settings = current_settings()
    app.send_task(
        PROCESS_TASK,
        args=[int(job_id)],
        queue=settings.queues.inference.name,
        priority=job_broker_priority(settings, job_id, level),
        countdown=countdown,
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
        producer=_together.get(),
    )


# The producer of the publications grouped by publishing_together in this thread, if any.
_together: ContextVar[Any] = ContextVar("dermpacs_publishing_together", default=None)


@contextlib.contextmanager
def publishing_together() -> Iterator[None]:
    """Tasks published in this block (:func:`publish_processing`) reach the broker together
    when it ends: one Redis pipeline, one round trip (kombu's ``Producer.batch``); none of
    them if the block raises. A transport without batches (the embedded broker) publishes
    each at once, as outside the block.

    A ``Publisher`` here spent 0.79-1.02 ms of CPU per job publishing one by one, much of it
    a Redis client and a round trip per message; in batches, 0.44-0.50 ms (docs/benchmarks.md).
    """
    with app.producer_or_acquire() as producer, producer.batch():
        token = _together.set(producer)
        try:
            yield
        finally:
            _together.reset(token)


class ProcessingPublisher:
    """:func:`publish_processing` for the listener's publisher, which publishes each batch of
    job ids :meth:`together` (:class:`dermpacs.jobs.publisher.Publisher`)."""

    def __call__(
        self, job_id: int, *, countdown: float | None = None, level: str | None = None
    ) -> None:
        publish_processing(job_id, countdown=countdown, level=level)

    together = staticmethod(publishing_together)


def processing_publisher(settings: Settings) -> ProcessingPublisher:
    """Configure the app in this process and return what the listener's publisher process
    (:class:`dermpacs.jobs.publisher.PublisherProcess`) calls."""
    configure(settings)
    return ProcessingPublisher()


def publish_dispatch(
    job_id: int, *, countdown: float | None = None, level: str | None = None
) -> None:
    """Put a delivery task for ``job_id`` on the dispatch queue, at its priority."""
    settings = current_settings()
    app.send_task(
        DISPATCH_TASK,
        args=[int(job_id)],
        queue=settings.queues.dispatch.name,
        priority=job_broker_priority(settings, job_id, level),
        countdown=countdown,
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
    )


def follow_up(task: Task, outcome: StageOutcome) -> str:
    """Schedule what a stage asked for: dispatch, or this task again after ``retry_in``."""
    if outcome.publish_dispatch:
        publish_dispatch(outcome.job_id)
    if outcome.retry_in is not None:
        # A new message with a countdown; this one is acknowledged. The job store, not the
        # message, counts attempts: the tasks have max_retries=None (no Celery limit).
        raise task.retry(countdown=outcome.retry_in)
    return outcome.state.value


def broker_epoch() -> str | None:
    """Which Redis process the broker is (its ``run_id``); None for other brokers or when it
    cannot be reached. A change means Redis restarted and may have lost its queues."""
    settings = current_settings()
    if uses_embedded_broker(settings):
        return None
    with app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        client = getattr(connection.default_channel, "client", None)
        if client is None or not hasattr(client, "info"):
            return None
        return str(client.info("server")["run_id"])


def redelivery_grace(settings: Settings) -> timedelta | None:
    """After how long a ``queued`` job is published again; None where the broker redelivers.

    Redis keeps an unacknowledged message and delivers it again; the embedded broker deletes
    a message when a worker takes it, so a job whose worker died before claiming it is found
    by its age: a whole task time limit after the received grace.
    """
    if not uses_embedded_broker(settings):
        return None
    return timedelta(seconds=settings.jobs.received_grace + settings.queues.inference.time_limit)


def queue_task(settings: Settings, queue: str) -> str:
    """The task that runs on ``queue`` (a queue name of ``[queues]``).

    Raises
    ------
    ConfigError
        No configured queue has this name.
    """
    tasks = {
        settings.queues.inference.name: PROCESS_TASK,
        settings.queues.dispatch.name: DISPATCH_TASK,
    }
    if queue not in tasks:
        raise ConfigError(f"no queue {queue!r}: the queues are {', '.join(tasks)}")
    return tasks[queue]


def recorded_queue_controls(settings: Settings) -> dict[str, QueueControlState]:
    """What admins recorded on the queues (paused, rate limits); empty on the embedded broker
    (queue control needs Redis) or when the job store cannot be read (logged)."""
    if uses_embedded_broker(settings):
        return {}
    from dermpacs.processing import shared_job_store

    try:
        return queue_controls(shared_job_store(settings))
    except Exception as exc:
        logger.warning("could not read paused queues and rate limits: %s", exc)
        return {}


def apply_recorded_rate_limits(settings: Settings, controls: dict[str, QueueControlState]) -> bool:
    """Set the tasks' rate limits that admins recorded; whether any changed."""
    changed = False
    for queue, state in controls.items():
        if state.rate_limit is None:
            continue
        try:
            task = app.tasks[queue_task(settings, queue)]
        except ConfigError:
            continue  # a queue this configuration no longer has
        limit = state.rate_limit or None
        if task.rate_limit != limit:
            task.rate_limit = limit
            logger.info("queue %s: rate limit %s (set by %s)", queue, limit or "none", state.actor)
            changed = True
    return changed


@signals.worker_ready.connect
def _apply_queue_controls(sender: Any = None, **_: Any) -> None:
    # A pause or rate limit given while this worker started (it did not hear the broadcast):
    # apply what is recorded now. The consumer (``sender``) is ready and consuming.
    settings = current_settings()
    controls = recorded_queue_controls(settings)
    if sender is None or not controls:
        return
    consuming = {queue.name for queue in sender.task_consumer.queues}
    for queue, state in sorted(controls.items()):
        if state.paused and queue in consuming:
            sender.cancel_task_queue(queue)
            logger.info("queue %s is paused (by %s): not consuming it", queue, state.actor)
    if apply_recorded_rate_limits(settings, controls):
        sender.reset_rate_limits()


def start_worker(*, queues: list[str], concurrency: int, pool: str, verbose: bool = False) -> int:
    """Run a worker for ``queues`` in this process until it is told to stop; its exit code.

    Queues that an admin paused are not consumed until ``dermpacs queues resume``, and the
    rate limits an admin set apply (:mod:`dermpacs.jobs.queue_control`). Call
    :func:`configure` first.
    """
    settings = current_settings()
    controls = recorded_queue_controls(settings)
    paused = sorted(q for q in queues if q in controls and controls[q].paused)
    for queue in paused:
        logger.info("queue %s is paused (by %s): not consuming it", queue, controls[queue].actor)
    apply_recorded_rate_limits(settings, controls)
    batch = settings.model.batch_size
    if batch > 1 and settings.queues.inference.name in queues and pool != "threads":
        logger.warning(
            "model.batch_size is %d, but photos are analysed together only by tasks running "
            "in one process (--pool threads --concurrency N); with --pool %s each photo is "
            "analysed alone, after waiting model.batch_wait_ms for others",
            batch,
            pool,
        )
    if pool == "prefork" and concurrency > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Each pool process runs its own torch; with torch's default (a thread per core in
        # every process) N processes oversubscribe the CPU several times over, which made
        # CPU inference about three times slower here. Share the cores instead; set
        # OMP_NUM_THREADS to choose otherwise. Read by torch when a pool process imports it.
        threads = max(1, (os.cpu_count() or 1) // concurrency)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        logger.info("%d pool processes: %d CPU thread(s) each for inference", concurrency, threads)
    worker = app.Worker(
        hostname=f"dermpacs-{'-'.join(queues)}-{os.getpid()}@{socket.gethostname()}",
        queues=queues,
        exclude_queues=paused,
        concurrency=concurrency,
        pool_cls=pool,
        loglevel="DEBUG" if verbose else "INFO",
        without_gossip=True,
        without_mingle=True,
        optimization="fair",
    )
    worker.start()
    return int(worker.exitcode or 0)
