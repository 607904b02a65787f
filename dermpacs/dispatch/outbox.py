"""Deliver a job's result objects to every configured destination.

The job store holds one delivery row per job x destination x object. :func:`deliver_job`
takes the rows that are due, sends them grouped by destination (one association per DICOM
destination), and records each outcome: delivered, retried later with exponential backoff and
jitter, or given up after ``max_attempts`` or ``dispatch.give_up_after``. A destination that
is down delays only its own rows. The job is delivered when every row is.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

from dermpacs.config import Settings
from dermpacs.dispatch.destinations import (
    DeliveryItem,
    ItemOutcome,
    ResultDestination,
    open_destinations,
)
from dermpacs.jobs.models import JobState, ResultKind, utc_now
from dermpacs.jobs.outcome import StageOutcome, backoff_delay
from dermpacs.jobs.store import DeliverySnapshot, JobStore, UnknownJobError

logger = logging.getLogger(__name__)

# A sender is given this much beyond the task time limit before another may take its rows.
LEASE_MARGIN_SECONDS = 30.0


def _group(rows: list[DeliverySnapshot]) -> dict[str, list[DeliverySnapshot]]:
    grouped: dict[str, list[DeliverySnapshot]] = defaultdict(list)
    for row in rows:
        grouped[row.destination].append(row)
    return grouped


def deliver_job(
    job_id: int,
    settings: Settings,
    store: JobStore,
    *,
    destinations: Mapping[str, ResultDestination] | None = None,
    now: datetime | None = None,
) -> StageOutcome:
    """Send the due result objects of one job and record what happened.

    Parameters
    ----------
    job_id
        A job in ``results_ready`` (others are left as they are).
    settings
        For the destinations, the dispatch queue's retry policy and ``dispatch.give_up_after``.
    store
        The job store.
    destinations
        Senders by name; built from ``settings.destinations`` by default.

    Returns
    -------
    StageOutcome
        The job's state, and ``retry_in`` when deliveries are waiting for a retry.
    """
    policy = settings.queues.dispatch
    destinations = destinations or open_destinations(
        settings.destinations, storage_root=Path(settings.storage.root), dispatch=settings.dispatch
    )
    try:
        detail = store.get(job_id)
    except UnknownJobError:
        logger.warning("job %d: no such job in the job store; task dropped", job_id)
        return StageOutcome(job_id, JobState.FAILED)
    job = detail.job
    if job.state is not JobState.RESULTS_READY:
        return StageOutcome(job_id, job.state)
    now = now or utc_now()
    deadline = job.created_at + timedelta(seconds=settings.dispatch.give_up_after)
    lease = timedelta(seconds=policy.time_limit + LEASE_MARGIN_SECONDS)
    outputs = {o.kind: o for o in detail.outputs}
    due = store.claim_due_deliveries(job_id, lease=lease, now=now)
    for name, rows in _group(due).items():
        destination = destinations.get(name)
        outcomes: dict[ResultKind, ItemOutcome]
        if destination is None:
            outcomes = {
                r.kind: ItemOutcome(False, f"destination {name!r} is not configured", True)
                for r in rows
            }
        else:
            items = []
            outcomes = {}
            for row in rows:
                output = outputs.get(row.kind)
                if output is None:
                    outcomes[row.kind] = ItemOutcome(
                        False, f"no {row.kind.value} was written", permanent=True
                    )
                    continue
                items.append(
                    DeliveryItem(
                        kind=row.kind,
                        path=Path(output.path),
                        sop_instance_uid=output.sop_instance_uid,
                        study_instance_uid=job.study_instance_uid,
                    )
                )
            try:
                outcomes.update(destination.deliver(items) if items else {})
            except OSError as exc:  # a result file unreadable: a local fault, retried
                outcomes.update({i.kind: ItemOutcome(False, f"local: {exc}") for i in items})
        # One retry time per destination, so that its objects go together again.
        next_attempt = now + timedelta(
            seconds=backoff_delay(
                max(r.attempts for r in rows),
                base=policy.retry_delay,
                cap=policy.retry_delay_max,
            )
        )
        for row in rows:
            outcome = outcomes.get(row.kind, ItemOutcome(False, "no outcome"))
            if outcome.delivered:
                store.record_delivery(row.id, delivered=True)
                logger.info("job %d: %s delivered to %s", job_id, row.kind.value, name)
                continue
            give_up = (
                outcome.permanent or row.attempts >= policy.max_attempts or next_attempt > deadline
            )
            store.record_delivery(
                row.id,
                delivered=False,
                error=outcome.error,
                next_attempt_at=None if give_up else next_attempt,
            )
            logger.warning(
                "job %d: %s to %s failed (attempt %d): %s%s",
                job_id,
                row.kind.value,
                name,
                row.attempts,
                outcome.error,
                "; given up" if give_up else f"; next at {next_attempt:%H:%M:%S}",
            )
    state, next_due = store.settle_delivery(job_id)
    retry_in = None
    if state is JobState.RESULTS_READY and next_due is not None:
        retry_in = max(0.0, (next_due - now).total_seconds())
    if state is JobState.DELIVERED:
        logger.info("job %d delivered", job_id)
    return StageOutcome(job_id, state, retry_in=retry_in)
