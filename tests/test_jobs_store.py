"""The job store against SQLite and PostgreSQL: states, idempotency, audit trail, deliveries."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from dermpacs.jobs import (
    ClaimStatus,
    DeliveryState,
    JobState,
    JobStore,
    JobStoreError,
    OutputRecord,
    ReceivedInstance,
    ResultKind,
    RetryStage,
    UnknownJobError,
    make_engine,
    reconcile_stalled,
    requeue_unfinished,
)
from dermpacs.jobs.models import utc_now
from tests import services

MODEL = "seg-1.0+cls-1.0"


def instance(n: int, *, spool: str = "/spool/x.dcm", caller: str = "CAM1") -> ReceivedInstance:
    return ReceivedInstance(
        study_instance_uid="1.2.3.1",
        series_instance_uid="1.2.3.1.1",
        sop_instance_uid=f"1.2.3.1.1.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.4",
        transfer_syntax_uid="1.2.840.10008.1.2.4.50",
        calling_ae_title=caller,
        spool_path=spool,
    )


def outputs_for(job_id: int) -> list[OutputRecord]:
    return [
        OutputRecord(
            kind=kind,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
            sop_instance_uid=f"2.25.{job_id}{i}",
            series_instance_uid=f"2.25.9{job_id}{i}",
            path=f"/results/{job_id}/{kind.value}.dcm",
        )
        for i, kind in enumerate(ResultKind)
    ]


@pytest.fixture
def store(database_url: str):
    store = JobStore(make_engine(database_url), actor="test")
    store.create_schema()
    yield store
    store.dispose()


def test_a_photo_sent_twice_makes_one_job(store: JobStore):
    first = store.record_received(instance(1, spool="/spool/a.dcm"), model_version=MODEL)
    again = store.record_received(instance(1, spool="/spool/b.dcm"), model_version=MODEL)
    assert first.created and first.needs_queueing
    assert not again.created and not again.needs_queueing
    assert again.job_id == first.job_id
    assert store.get(first.job_id).job.spool_path == "/spool/a.dcm"
    # another model version is another job
    other = store.record_received(instance(1), model_version="seg-2.0+cls-1.0")
    assert other.created and other.job_id != first.job_id


def test_concurrent_identical_stores_make_one_job(store: JobStore):
    outcomes = []

    def record(k: int) -> None:
        outcomes.append(store.record_received(instance(7, spool=f"/s/{k}"), model_version=MODEL))

    services.in_threads(record, range(6), timeout=60)
    assert len({o.job_id for o in outcomes}) == 1
    assert sum(o.created for o in outcomes) == 1
    assert store.counts_by_state()[JobState.RECEIVED] == 1


def test_the_happy_path_leaves_an_audit_trail(store: JobStore):
    job_id = store.record_received(instance(2), model_version=MODEL).job_id
    assert store.mark_queued([job_id]) == 1
    claim = store.claim_for_processing(job_id, lease=timedelta(minutes=5))
    assert claim.status is ClaimStatus.CLAIMED and claim.job.attempts == 1
    state = store.record_results(
        job_id,
        outputs_for(job_id),
        destinations={"pacs": ["seg", "sr", "overlay"], "outbox": ["overlay"]},
        finding="atopic_dermatitis",
    )
    assert state is JobState.RESULTS_READY
    due = store.claim_due_deliveries(job_id, lease=timedelta(minutes=5))
    assert sorted((d.destination, d.kind.value) for d in due) == [
        ("outbox", "overlay"),
        ("pacs", "overlay"),
        ("pacs", "seg"),
        ("pacs", "sr"),
    ]
    # a second dispatcher finds nothing to take
    assert store.claim_due_deliveries(job_id, lease=timedelta(minutes=5)) == []
    for d in due:
        store.record_delivery(d.id, delivered=True)
    assert store.settle_delivery(job_id) == (JobState.DELIVERED, None)
    detail = store.get(job_id)
    assert [e.to_state for e in detail.events] == [
        JobState.RECEIVED,
        JobState.QUEUED,
        JobState.PROCESSING,
        JobState.RESULTS_READY,
        JobState.DELIVERED,
    ]
    assert detail.events[0].from_state is None and detail.events[0].reason == "stored by CAM1"
    assert all(e.at.tzinfo is not None for e in detail.events)
    assert {o.kind for o in detail.outputs} == set(ResultKind)
    assert detail.job.finding == "atopic_dermatitis"
    assert detail.as_json()["state"] == "delivered"


def test_claims_respect_a_fresh_lease_and_take_over_a_stale_one(store: JobStore):
    job_id = store.record_received(instance(3), model_version=MODEL).job_id
    assert store.claim_for_processing(job_id, lease=timedelta(hours=1)).status is (
        ClaimStatus.CLAIMED
    )
    busy = store.claim_for_processing(job_id, lease=timedelta(hours=1))
    assert busy.status is ClaimStatus.BUSY and 3500 < busy.retry_after <= 3600
    taken = store.claim_for_processing(job_id, lease=timedelta(0))
    assert taken.status is ClaimStatus.CLAIMED and taken.job.attempts == 2
    store.record_results(job_id, outputs_for(job_id), destinations={}, finding=None)
    assert store.claim_for_processing(job_id, lease=timedelta(0)).status is ClaimStatus.DONE


def test_processing_failures_retry_then_fail_and_an_admin_retry_restarts(store: JobStore):
    job_id = store.record_received(instance(4), model_version=MODEL).job_id
    store.claim_for_processing(job_id, lease=timedelta(0))
    assert (
        store.record_processing_failure(job_id, "timeout", permanent=False, max_attempts=2)
        is JobState.QUEUED
    )
    store.claim_for_processing(job_id, lease=timedelta(0))
    assert (
        store.record_processing_failure(job_id, "timeout", permanent=False, max_attempts=2)
        is JobState.FAILED
    )
    assert store.claim_for_processing(job_id, lease=timedelta(0)).status is ClaimStatus.FAILED
    assert store.get(job_id).job.last_error == "timeout"
    assert store.retry(job_id, actor="admin") is RetryStage.PROCESSING
    job = store.get(job_id)
    assert job.job.state is JobState.RECEIVED and job.job.attempts == 0
    assert job.events[-1].actor == "admin"
    with pytest.raises(JobStoreError, match="only a failed or cancelled job"):
        store.retry(job_id)


def test_a_permanent_failure_fails_at_once_and_a_resend_restarts_it(store: JobStore):
    job_id = store.record_received(instance(5, spool="/s/old"), model_version=MODEL).job_id
    store.claim_for_processing(job_id, lease=timedelta(0))
    store.record_processing_failure(job_id, "no pixel data", permanent=True, max_attempts=9)
    assert store.get(job_id).job.state is JobState.FAILED
    resent = store.record_received(instance(5, spool="/s/new"), model_version=MODEL)
    assert resent.job_id == job_id and resent.needs_queueing and not resent.created
    assert store.get(job_id).job.spool_path == "/s/new"


def test_delivery_retries_and_give_up_fail_the_job_then_admin_retry_resends(store: JobStore):
    job_id = store.record_received(instance(6), model_version=MODEL).job_id
    store.claim_for_processing(job_id, lease=timedelta(0))
    store.record_results(job_id, outputs_for(job_id), destinations={"pacs": ["sr"]}, finding=None)
    (row,) = store.claim_due_deliveries(job_id, lease=timedelta(minutes=5))
    later = utc_now() + timedelta(minutes=1)
    store.record_delivery(row.id, delivered=False, error="refused", next_attempt_at=later)
    state, due = store.settle_delivery(job_id)
    assert state is JobState.RESULTS_READY and due == later
    assert store.claim_due_deliveries(job_id, lease=timedelta(minutes=5)) == []
    assert store.overdue_dispatch(due_before=later + timedelta(seconds=1)) == [job_id]
    (row,) = store.claim_due_deliveries(
        job_id, lease=timedelta(minutes=5), now=later + timedelta(seconds=1)
    )
    assert row.attempts == 2
    store.record_delivery(row.id, delivered=False, error="refused again")
    state, _ = store.settle_delivery(job_id)
    assert state is JobState.FAILED
    assert "pacs/sr: refused again" in (store.get(job_id).job.last_error or "")
    assert store.retry(job_id) is RetryStage.DISPATCH
    (row,) = store.deliveries(job_id)
    assert row.state is DeliveryState.PENDING and row.attempts == 0


def test_a_sender_that_died_mid_send_is_taken_over_after_its_lease(store: JobStore):
    job_id = store.record_received(instance(8), model_version=MODEL).job_id
    store.claim_for_processing(job_id, lease=timedelta(0))
    store.record_results(job_id, outputs_for(job_id), destinations={"pacs": ["seg"]}, finding=None)
    assert len(store.claim_due_deliveries(job_id, lease=timedelta(hours=1))) == 1
    assert store.claim_due_deliveries(job_id, lease=timedelta(hours=1)) == []
    (again,) = store.claim_due_deliveries(job_id, lease=timedelta(0))
    assert again.attempts == 2


def test_leases_are_renewed_only_while_held(store: JobStore):
    job_id = store.record_received(instance(18), model_version=MODEL).job_id
    assert not store.renew_processing_lease(job_id)  # not processing: nothing to renew
    store.claim_for_processing(job_id, lease=timedelta(0))
    before = store.get(job_id).job.updated_at
    time.sleep(0.01)
    assert store.renew_processing_lease(job_id)
    assert store.get(job_id).job.updated_at > before
    # a renewed lease is fresh: another worker is told to wait
    busy = store.claim_for_processing(job_id, lease=timedelta(seconds=30))
    assert busy.status.value == "busy" and 29 < busy.retry_after <= 30
    store.record_results(job_id, outputs_for(job_id), destinations={"pacs": ["seg"]}, finding=None)
    assert not store.renew_processing_lease(job_id)
    (row,) = store.claim_due_deliveries(job_id, lease=timedelta(hours=1))
    assert store.renew_delivery_leases([row.id]) == 1
    store.record_delivery(row.id, delivered=True)
    assert store.renew_delivery_leases([row.id]) == 0


def test_results_for_a_destination_object_that_was_not_written_are_refused(store: JobStore):
    job_id = store.record_received(instance(9), model_version=MODEL).job_id
    store.claim_for_processing(job_id, lease=timedelta(0))
    with pytest.raises(JobStoreError, match="wants seg"):
        store.record_results(
            job_id, outputs_for(job_id)[1:], destinations={"pacs": ["seg"]}, finding=None
        )


def test_unknown_job(store: JobStore):
    with pytest.raises(UnknownJobError):
        store.get(12345)


def test_requeue_unfinished_publishes_every_unfinished_job_by_stage(store: JobStore):
    ids = [store.record_received(instance(n), model_version=MODEL).job_id for n in range(10, 15)]
    received, queued, processing, ready, delivered = ids
    store.mark_queued([queued])
    store.claim_for_processing(processing, lease=timedelta(0))
    store.claim_for_processing(ready, lease=timedelta(0))
    store.record_results(ready, outputs_for(ready), destinations={"p": ["sr"]}, finding=None)
    store.claim_for_processing(delivered, lease=timedelta(0))
    store.record_results(delivered, outputs_for(delivered), destinations={}, finding=None)
    store.settle_delivery(delivered)

    processed: list[int] = []
    dispatched: list[int] = []

    def publish_processing(job_id: int) -> None:
        if job_id == processing:
            raise ConnectionError("broker down")
        processed.append(job_id)

    summary = requeue_unfinished(
        store, publish_processing=publish_processing, publish_dispatch=dispatched.append
    )
    assert processed == [received, queued]
    assert dispatched == [ready]
    assert summary.unpublished == [processing]
    assert store.get(received).job.state is JobState.QUEUED


def test_reconciler_publishes_stuck_jobs_only(store: JobStore):
    stuck = store.record_received(instance(20), model_version=MODEL).job_id
    fresh_queued = store.record_received(instance(21), model_version=MODEL).job_id
    store.mark_queued([fresh_queued])
    dead_worker = store.record_received(instance(22), model_version=MODEL).job_id
    store.claim_for_processing(dead_worker, lease=timedelta(0))
    published: list[int] = []
    later = utc_now() + timedelta(minutes=10)
    summary = reconcile_stalled(
        store,
        publish_processing=published.append,
        publish_dispatch=published.append,
        received_grace=timedelta(minutes=1),
        processing_lease=timedelta(minutes=5),
        dispatch_grace=timedelta(minutes=1),
        now=later,
    )
    assert sorted(summary.processing) == [stuck, dead_worker]
    assert store.get(dead_worker).job.state is JobState.QUEUED
    assert "worker lease expired" in [e.reason for e in store.get(dead_worker).events]


# -- cancel ---------------------------------------------------------------------------------


def _job_in(store: JobStore, n: int, state: JobState) -> int:
    """A job brought to ``state`` through the store's own moves."""
    job_id = store.record_received(instance(n), model_version=MODEL).job_id
    if state is JobState.RECEIVED:
        return job_id
    store.mark_queued([job_id])
    if state is JobState.QUEUED:
        return job_id
    store.claim_for_processing(job_id, lease=timedelta(minutes=5))
    if state is JobState.PROCESSING:
        return job_id
    store.record_results(job_id, outputs_for(job_id), destinations={"pacs": ["sr"]}, finding="x")
    if state is JobState.RESULTS_READY:
        return job_id
    if state is JobState.FAILED:
        store.fail(job_id, "given up")
        return job_id
    (row,) = store.claim_due_deliveries(job_id, lease=timedelta(minutes=5))
    store.record_delivery(row.id, delivered=True)
    assert store.settle_delivery(job_id)[0] is JobState.DELIVERED
    return job_id


@pytest.mark.parametrize(
    "state",
    [JobState.RECEIVED, JobState.QUEUED, JobState.PROCESSING, JobState.RESULTS_READY],
)
def test_an_unfinished_job_can_be_cancelled_with_actor_and_reason(store: JobStore, state):
    job_id = _job_in(store, 40, state)
    assert store.cancel(job_id, reason="  wrong patient ", actor="admin:alice") is (
        JobState.CANCELLED
    )
    detail = store.get(job_id)
    assert detail.job.state is JobState.CANCELLED
    last = detail.events[-1]
    assert (last.from_state, last.to_state) == (state, JobState.CANCELLED)
    assert (last.actor, last.reason) == ("admin:alice", "cancelled: wrong patient")
    assert [j.id for j in store.list_jobs(states=[JobState.CANCELLED])] == [job_id]
    assert store.counts_by_state()[JobState.CANCELLED] == 1
    assert store.unfinished() == []


@pytest.mark.parametrize("state", [JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED])
def test_a_finished_job_cannot_be_cancelled(store: JobStore, state):
    job_id = _job_in(store, 41, JobState.QUEUED if state is JobState.CANCELLED else state)
    if state is JobState.CANCELLED:
        store.cancel(job_id, reason="first")
    events = len(store.get(job_id).events)
    with pytest.raises(JobStoreError, match=rf"job {job_id} is {state.value}: only a job that"):
        store.cancel(job_id, reason="again")
    assert store.get(job_id).job.state is state
    assert len(store.get(job_id).events) == events
    with pytest.raises(UnknownJobError):
        store.cancel(9999, reason="none")


def test_a_worker_mid_way_cannot_move_a_cancelled_job_on(store: JobStore):
    job_id = _job_in(store, 42, JobState.PROCESSING)
    store.cancel(job_id, reason="stop")
    assert store.renew_processing_lease(job_id) is False
    assert store.record_results(
        job_id, outputs_for(job_id), destinations={"pacs": ["sr"]}, finding="x"
    ) is (JobState.CANCELLED)
    assert store.record_processing_failure(job_id, "boom", permanent=False, max_attempts=3) is (
        JobState.CANCELLED
    )
    assert store.fail(job_id, "too old") is JobState.CANCELLED
    assert not store.release_stale(job_id, lease=timedelta(0))
    assert store.mark_queued([job_id]) == 0
    claim = store.claim_for_processing(job_id, lease=timedelta(0))
    assert claim.status is ClaimStatus.CANCELLED
    detail = store.get(job_id)
    assert detail.job.state is JobState.CANCELLED
    assert detail.outputs == () and detail.deliveries == ()
    assert detail.events[-1].to_state is JobState.CANCELLED


def test_pending_deliveries_of_a_cancelled_job_are_not_sent(store: JobStore):
    job_id = _job_in(store, 43, JobState.RESULTS_READY)
    store.cancel(job_id, reason="sent to the wrong PACS rule")
    assert store.claim_due_deliveries(job_id, lease=timedelta(0)) == []
    assert store.settle_delivery(job_id)[0] is JobState.CANCELLED
    far = utc_now() + timedelta(days=1)
    assert store.overdue_dispatch(due_before=far, sending_before=far) == []
    (row,) = store.deliveries(job_id)
    assert row.state is DeliveryState.PENDING  # kept for a retry, never taken


def test_the_reconciler_and_the_start_up_rule_leave_cancelled_jobs_alone(store: JobStore):
    ids = [
        _job_in(store, 50 + i, s)
        for i, s in enumerate(
            [JobState.RECEIVED, JobState.QUEUED, JobState.PROCESSING, JobState.RESULTS_READY]
        )
    ]
    for job_id in ids:
        store.cancel(job_id, reason="bulk")
    published: list[int] = []
    summary = requeue_unfinished(
        store, publish_processing=published.append, publish_dispatch=published.append
    )
    assert summary.total == 0
    later = utc_now() + timedelta(hours=1)
    summary = reconcile_stalled(
        store,
        publish_processing=published.append,
        publish_dispatch=published.append,
        received_grace=timedelta(0),
        processing_lease=timedelta(0),
        dispatch_grace=timedelta(0),
        dispatch_lease=timedelta(0),
        queued_grace=timedelta(0),
        now=later,
    )
    assert summary.total == 0 and published == []
    assert {store.get(i).job.state for i in ids} == {JobState.CANCELLED}


def test_retry_undoes_a_cancel_where_the_job_was(store: JobStore):
    queued = _job_in(store, 60, JobState.QUEUED)
    ready = _job_in(store, 61, JobState.RESULTS_READY)
    for job_id in (queued, ready):
        store.cancel(job_id, reason="oops")
    assert store.retry(queued, actor="admin:bob") is RetryStage.PROCESSING
    assert store.get(queued).job.state is JobState.RECEIVED
    assert store.retry(ready, actor="admin:bob") is RetryStage.DISPATCH
    assert store.get(ready).job.state is JobState.RESULTS_READY
    (row,) = store.claim_due_deliveries(ready, lease=timedelta(minutes=5))
    assert row.destination == "pacs"
    last = store.get(ready).events[-1]
    assert (last.from_state, last.to_state, last.actor) == (
        JobState.CANCELLED,
        JobState.RESULTS_READY,
        "admin:bob",
    )


def test_a_resend_of_a_cancelled_photo_does_not_restart_it(store: JobStore):
    job_id = _job_in(store, 62, JobState.QUEUED)
    store.cancel(job_id, reason="duplicate")
    again = store.record_received(instance(62, spool="/s/again"), model_version=MODEL)
    assert (again.job_id, again.created, again.needs_queueing) == (job_id, False, False)
    assert again.state is JobState.CANCELLED


def test_lazy_commits_are_visible_at_once_and_leave_later_commits_synchronous(store: JobStore):
    # The listener records jobs with synchronous_commit=False (its spool file is what is
    # durable); every other transaction on the same pooled connections must stay synchronous.
    outcome = store.record_received(instance(1), model_version=MODEL, synchronous_commit=False)
    assert outcome.created and outcome.needs_queueing
    again = store.record_received(instance(1), model_version=MODEL, synchronous_commit=False)
    assert (again.job_id, again.created, again.needs_queueing) == (outcome.job_id, False, False)
    assert store.mark_queued([outcome.job_id], synchronous_commit=False) == 1
    assert store.get(outcome.job_id).job.state is JobState.QUEUED
    with store.engine.connect() as connection:
        if store.engine.dialect.name == "sqlite":
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        else:
            assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
