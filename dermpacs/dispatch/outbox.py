"""Deliver a job's result objects to every configured destination.

The job store holds one delivery row per job x destination x object. :func:`deliver_job`
takes the rows that are due, sends them grouped by destination (one association per DICOM
destination, the destinations side by side in threads), and records each outcome as soon as
its destination answers: delivered, retried later with exponential backoff and jitter, or
given up after ``max_attempts`` or ``dispatch.give_up_after``. A destination that is down, or
that hangs until its timeouts, delays only its own rows. The job is delivered when every row
is. The rows being sent are leased (``jobs.lease_timeout``, renewed while sending), so that
another dispatcher sends them again only when this one died.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timedelta
from pathlib import Path

from dermpacs.config import Settings
from dermpacs.dispatch.destinations import (
    DeliveryItem,
    ItemOutcome,
    ResultDestination,
    open_destinations,
)
from dermpacs.jobs.lease import LeaseRenewal
from dermpacs.jobs.models import JobState, ResultKind, utc_now
from dermpacs.jobs.outcome import StageOutcome, backoff_delay
from dermpacs.jobs.store import (
    DeliverySnapshot,
    JobSnapshot,
    JobStore,
    OutputRecord,
    UnknownJobError,
)

logger = logging.getLogger(__name__)


def _group(rows: list[DeliverySnapshot]) -> dict[str, list[DeliverySnapshot]]:
    grouped: dict[str, list[DeliverySnapshot]] = defaultdict(list)
    for row in rows:
        grouped[row.destination].append(row)
    return grouped


def _send_to_destination(
    name: str,
    rows: list[DeliverySnapshot],
    destination: ResultDestination | None,
    job: JobSnapshot,
    outputs: Mapping[ResultKind, OutputRecord],
) -> dict[ResultKind, ItemOutcome]:
    """Send one destination's due rows; an outcome per row kind. Never raises."""
    if destination is None:
        return {
            r.kind: ItemOutcome(False, f"destination {name!r} is not configured", True)
            for r in rows
        }
    items = []
    outcomes: dict[ResultKind, ItemOutcome] = {}
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
    except Exception as exc:  # a sender bug must not lose the other destinations' outcomes
        logger.exception("job %d: sending to %s failed", job.id, name)
        outcomes.update({i.kind: ItemOutcome(False, f"{type(exc).__name__}: {exc}") for i in items})
    return outcomes


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
    lease_seconds = settings.jobs.lease_timeout
    outputs = {o.kind: o for o in detail.outputs}
    due = store.claim_due_deliveries(job_id, lease=timedelta(seconds=lease_seconds), now=now)
    groups = _group(due)
    if not groups:
        return _settle(job_id, store, now)
    renewal = LeaseRenewal(
        lambda: store.renew_delivery_leases([r.id for r in due]),
        lease=lease_seconds,
        what=f"job {job_id} deliveries",
    )
    with (
        renewal,
        ThreadPoolExecutor(
            max_workers=len(groups), thread_name_prefix=f"dermpacs-send-{job_id}"
        ) as pool,
    ):
        futures = {
            pool.submit(
                _send_to_destination, name, rows, destinations.get(name), job, outputs
            ): name
            for name, rows in groups.items()
        }
        for future in as_completed(futures):
            name = futures[future]
            _record_outcomes(
                job_id, name, groups[name], future.result(), store, settings, now, deadline
            )
    return _settle(job_id, store, now)


def _record_outcomes(
    job_id: int,
    name: str,
    rows: list[DeliverySnapshot],
    outcomes: Mapping[ResultKind, ItemOutcome],
    store: JobStore,
    settings: Settings,
    now: datetime,
    deadline: datetime,
) -> None:
    """Record what one destination answered for its rows (retry time, or given up)."""
    policy = settings.queues.dispatch
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
            "; given up" if give_up else f"; retry in {(next_attempt - now).total_seconds():.1f} s",
        )


def _settle(job_id: int, store: JobStore, now: datetime) -> StageOutcome:
    state, next_due = store.settle_delivery(job_id)
    retry_in = None
    if state is JobState.RESULTS_READY and next_due is not None:
        retry_in = max(0.0, (next_due - now).total_seconds())
    if state is JobState.DELIVERED:
        logger.info("job %d delivered", job_id)
    return StageOutcome(job_id, state, retry_in=retry_in)
