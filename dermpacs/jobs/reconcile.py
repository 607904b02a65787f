"""Put jobs back on the queue when their message may have been lost.

The job store is the source of truth; broker messages are only a way to wake a worker. At
start-up every unfinished job is published again (:func:`requeue_unfinished`); while the
listener runs, :func:`reconcile_stalled` publishes jobs that never reached the broker (it was
down), jobs whose worker died, and deliveries whose retry message went missing. Tasks are
idempotent, so publishing a job twice costs a skipped task, never a second result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from dermpacs.jobs.models import JobState, utc_now
from dermpacs.jobs.store import JobStore

logger = logging.getLogger(__name__)

Publish = Callable[[int], None]


@dataclass
class RequeueSummary:
    """Job ids published again, by stage, and those whose publication failed."""

    processing: list[int] = field(default_factory=list)
    dispatch: list[int] = field(default_factory=list)
    unpublished: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.processing) + len(self.dispatch)


def _publish_all(ids: list[int], publish: Publish, done: list[int], unpublished: list[int]) -> None:
    for index, job_id in enumerate(ids):
        try:
            publish(job_id)
        except Exception as exc:  # broker down: the jobs stay where they are, tried next time
            # One line, not one per job, and no waiting on a down broker for every job.
            rest = ids[index:]
            logger.warning(
                "could not publish job %d (%s); %d job(s) left for the next pass",
                job_id,
                exc,
                len(rest),
            )
            unpublished.extend(rest)
            return
        else:
            done.append(job_id)


def requeue_unfinished(
    store: JobStore, *, publish_processing: Publish, publish_dispatch: Publish
) -> RequeueSummary:
    """Publish every job that is not delivered nor failed: the start-up rule.

    Jobs with results go to dispatch, the others to processing; ``received`` jobs that were
    published move to ``queued``.
    """
    summary = RequeueSummary()
    jobs = store.unfinished()
    to_dispatch = [j.id for j in jobs if j.state is JobState.RESULTS_READY]
    to_process = [j.id for j in jobs if j.state is not JobState.RESULTS_READY]
    _publish_all(to_process, publish_processing, summary.processing, summary.unpublished)
    _publish_all(to_dispatch, publish_dispatch, summary.dispatch, summary.unpublished)
    store.mark_queued(summary.processing, reason="re-published at start-up")
    if summary.total or summary.unpublished:
        logger.info(
            "start-up: re-published %d job(s) for processing, %d for dispatch, %d not published",
            len(summary.processing),
            len(summary.dispatch),
            len(summary.unpublished),
        )
    return summary


def republish_after_broker_loss(
    store: JobStore, *, publish_processing: Publish, publish_dispatch: Publish
) -> RequeueSummary:
    """Publish every ``queued`` and ``results_ready`` job again: the broker lost its messages.

    Called when the broker is found restarted (Redis without persistence forgets its queues):
    the job store still knows what waits. Jobs whose message survived get a second one, which
    costs a skipped task.
    """
    summary = RequeueSummary()
    queued = [j.id for j in store.list_jobs(states=[JobState.QUEUED], limit=None)]
    ready = [j.id for j in store.list_jobs(states=[JobState.RESULTS_READY], limit=None)]
    _publish_all(queued, publish_processing, summary.processing, summary.unpublished)
    _publish_all(ready, publish_dispatch, summary.dispatch, summary.unpublished)
    store.touch(summary.processing)
    logger.warning(
        "broker restarted: re-published %d queued job(s) and %d job(s) awaiting delivery "
        "(%d not published)",
        len(summary.processing),
        len(summary.dispatch),
        len(summary.unpublished),
    )
    return summary


def reconcile_stalled(
    store: JobStore,
    *,
    publish_processing: Publish,
    publish_dispatch: Publish,
    received_grace: timedelta,
    processing_lease: timedelta,
    dispatch_grace: timedelta,
    dispatch_lease: timedelta | None = None,
    queued_grace: timedelta | None = None,
    now: datetime | None = None,
) -> RequeueSummary:
    """Publish jobs that are stuck: the periodic rule.

    Parameters
    ----------
    received_grace
        A ``received`` job older than this never reached the broker.
    processing_lease
        A ``processing`` job unchanged for this long lost its worker; it is moved back to
        ``received`` and published.
    dispatch_grace
        A pending delivery overdue by this much lost its retry message.
    dispatch_lease
        A delivery taken for sending and unchanged for this long lost its sender.
    queued_grace
        ``queued`` jobs unchanged for this long are published again; None leaves them alone.

    Notes
    -----
    With Redis, ``queued`` jobs are best left alone (``queued_grace=None``): the broker holds
    their message and late acknowledgement redelivers it when a worker dies, and a long
    backlog is not a fault. The embedded broker removes a message when a worker takes it, so
    there a job whose worker died before claiming it is found by ``queued_grace``.
    """
    now = now or utc_now()
    summary = RequeueSummary()
    received = [
        j.id
        for j in store.list_jobs(
            states=[JobState.RECEIVED], updated_before=now - received_grace, limit=None
        )
    ]
    stale = [
        j.id
        for j in store.list_jobs(
            states=[JobState.PROCESSING], updated_before=now - processing_lease, limit=None
        )
    ]
    stale = [
        job_id for job_id in stale if store.release_stale(job_id, lease=processing_lease, now=now)
    ]
    _publish_all(received + stale, publish_processing, summary.processing, summary.unpublished)
    store.mark_queued(summary.processing, reason="re-published by the reconciler")
    if queued_grace is not None:
        waiting = [
            j.id
            for j in store.list_jobs(
                states=[JobState.QUEUED], updated_before=now - queued_grace, limit=None
            )
        ]
        republished: list[int] = []
        _publish_all(waiting, publish_processing, republished, summary.unpublished)
        store.touch(republished)  # not again before another queued_grace
        summary.processing.extend(republished)
    overdue = store.overdue_dispatch(
        due_before=now - dispatch_grace,
        sending_before=None if dispatch_lease is None else now - dispatch_lease,
    )
    _publish_all(overdue, publish_dispatch, summary.dispatch, summary.unpublished)
    if summary.total or summary.unpublished:
        logger.info(
            "reconciler: re-published %d job(s) for processing, %d for dispatch, %d not published",
            len(summary.processing),
            len(summary.dispatch),
            len(summary.unpublished),
        )
    return summary
