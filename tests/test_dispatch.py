"""Dispatch: the C-STORE sender against Orthanc, the folder writer, and the outbox's retries."""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from dermpacs.config import Settings
from dermpacs.dispatch.destinations import DeliveryItem, FolderDestination, ItemOutcome
from dermpacs.dispatch.outbox import deliver_job
from dermpacs.dispatch.scu import PeerAddress, SenderTimeouts, requested_contexts, send_instances
from dermpacs.jobs import (
    DeliveryState,
    JobState,
    JobStore,
    OutputRecord,
    ReceivedInstance,
    ResultKind,
    make_engine,
)
from dermpacs.jobs.models import utc_now
from dermpacs.jobs.outcome import backoff_delay
from tests import services
from tests.test_intake_admission import encode, photo


def photo_file(folder: Path, name: str = "photo.dcm", **kwargs) -> tuple[Path, str]:
    ds = photo(**kwargs)
    path = folder / name
    path.write_bytes(encode(ds))
    return path, ds.SOPInstanceUID


def test_contexts_propose_each_class_with_its_own_syntax():
    from pydicom.dataset import FileMetaDataset

    a, b = photo(), photo()

    a.file_meta = FileMetaDataset()
    a.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    b.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    b.file_meta = FileMetaDataset()
    b.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    contexts = dict(requested_contexts([a, b]))
    assert contexts[a.SOPClassUID] == [JPEGBaseline8Bit]
    assert contexts[b.SOPClassUID] == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(1)
    delays = [backoff_delay(n, base=10, cap=300, rng=rng) for n in range(1, 9)]
    for n, delay in enumerate(delays, start=1):
        full = min(300, 10 * 2 ** (n - 1))
        assert full / 2 <= delay <= full
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered
    with pytest.raises(ValueError):
        backoff_delay(0, base=1, cap=1)


def test_the_folder_destination_writes_whole_files_by_study(tmp_path):
    source, uid = photo_file(tmp_path)
    folder = FolderDestination("outbox", tmp_path / "outbox")
    item = DeliveryItem(ResultKind.SR, source, uid, "1.2.3.4")
    assert folder.deliver([item]) == {ResultKind.SR: ItemOutcome(True)}
    assert folder.deliver([item]) == {ResultKind.SR: ItemOutcome(True)}  # idempotent
    files = list((tmp_path / "outbox").rglob("*"))
    assert [p.relative_to(tmp_path / "outbox").as_posix() for p in files if p.is_file()] == [
        f"1.2.3.4/sr-{uid}.dcm"
    ]
    assert (tmp_path / "outbox" / "1.2.3.4" / f"sr-{uid}.dcm").read_bytes() == source.read_bytes()


def test_a_folder_that_cannot_be_written_is_a_failed_outcome(tmp_path):
    source, uid = photo_file(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the folder should be")
    folder = FolderDestination("outbox", blocker)
    (outcome,) = folder.deliver([DeliveryItem(ResultKind.SEG, source, uid, "1.2.3")]).values()
    assert not outcome.delivered and "cannot write" in (outcome.error or "")


def test_sending_to_a_closed_port_reports_every_object(tmp_path):
    paths = [photo_file(tmp_path, f"p{i}.dcm")[0] for i in range(2)]
    peer = PeerAddress("NOBODY", "127.0.0.1", services.free_port())
    results = send_instances(paths, peer, SenderTimeouts(acse=2, network=2))
    assert [r.stored for r in results] == [False, False]
    assert all("association" in (r.error or "") for r in results)


@pytest.mark.integration
def test_send_instances_stores_in_orthanc(tmp_path, orthanc):
    sent = [photo_file(tmp_path, f"p{i}.dcm") for i in range(3)]
    peer = PeerAddress(orthanc.aet, "127.0.0.1", orthanc.dicom_port, "DERMPACS")
    results = send_instances([p for p, _ in sent], peer)
    assert [r.status for r in results] == [0, 0, 0]
    assert orthanc.count_instances() == 3


# --- the outbox ---------------------------------------------------------------------------


class FlakyDestination:
    """Fails the first ``failures`` deliveries, then delivers."""

    def __init__(self, name: str, failures: int) -> None:
        self.name = name
        self.failures = failures
        self.calls: list[list[ResultKind]] = []

    def deliver(self, items):
        self.calls.append([i.kind for i in items])
        if len(self.calls) <= self.failures:
            return {i.kind: ItemOutcome(False, "PACS said 0xA700") for i in items}
        return {i.kind: ItemOutcome(True) for i in items}


@pytest.fixture
def ready_job(tmp_path):
    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}"))
    store.create_schema()
    job_id = store.record_received(
        ReceivedInstance(
            "1.2.3",
            "1.2.3.1",
            "1.2.3.1.1",
            "1.2.840.10008.5.1.4.1.1.7",
            ExplicitVRLittleEndian,
            "CAM",
            "/spool/x",
        ),
        model_version="m",
    ).job_id
    store.claim_for_processing(job_id, lease=timedelta(0))
    outputs = []
    for kind in ResultKind:
        path, uid = photo_file(tmp_path, f"{kind.value}.dcm")
        outputs.append(OutputRecord(kind, "1.2.840.10008.5.1.4.1.1.7", uid, "1.2.9", str(path)))
    store.record_results(
        job_id,
        outputs,
        destinations={"pacs": ["seg", "sr", "overlay"], "outbox": ["overlay"]},
        finding=None,
    )
    yield store, job_id
    store.dispose()


def settings_for(tmp_path: Path, **dispatch_queue) -> Settings:
    queue = {"name": "dispatch", "retry_delay": 10.0, "retry_delay_max": 60.0, **dispatch_queue}
    return Settings.model_validate(
        {
            "storage": {"root": str(tmp_path)},
            "queues": {"dispatch": queue},
            "destinations": [
                {"name": "pacs", "kind": "dicom"},
                {"name": "outbox", "kind": "folder", "objects": ["overlay"]},
            ],
        }
    )


def test_a_destination_that_is_down_is_retried_without_blocking_the_other(tmp_path, ready_job):
    store, job_id = ready_job
    settings = settings_for(tmp_path, max_attempts=5)
    pacs = FlakyDestination("pacs", failures=2)
    outbox = FlakyDestination("outbox", failures=0)
    destinations = {"pacs": pacs, "outbox": outbox}

    first = deliver_job(job_id, settings, store, destinations=destinations)
    assert first.state is JobState.RESULTS_READY and first.retry_in is not None
    assert 5 <= first.retry_in <= 10  # attempt 1: between half and all of retry_delay
    rows = {(d.destination, d.kind): d for d in store.deliveries(job_id)}
    assert rows[("outbox", ResultKind.OVERLAY)].state is DeliveryState.DELIVERED
    assert rows[("pacs", ResultKind.SEG)].state is DeliveryState.PENDING
    assert rows[("pacs", ResultKind.SEG)].last_error == "PACS said 0xA700"

    # nothing is due yet: no send happens
    assert deliver_job(job_id, settings, store, destinations=destinations).retry_in
    assert len(pacs.calls) == 1 and len(outbox.calls) == 1

    later = utc_now() + timedelta(seconds=11)
    second = deliver_job(job_id, settings, store, destinations=destinations, now=later)
    assert second.state is JobState.RESULTS_READY and 10 <= second.retry_in <= 21
    third = deliver_job(
        job_id, settings, store, destinations=destinations, now=later + timedelta(seconds=30)
    )
    assert third.state is JobState.DELIVERED and third.retry_in is None
    assert pacs.calls == [[ResultKind.SEG, ResultKind.SR, ResultKind.OVERLAY]] * 3
    assert len(outbox.calls) == 1  # never sent twice
    trail = [e.reason for e in store.get(job_id).events]
    assert trail[-1] == "acknowledged by outbox, pacs"


def test_a_destination_that_stays_down_fails_the_job_after_max_attempts(tmp_path, ready_job):
    store, job_id = ready_job
    settings = settings_for(tmp_path, max_attempts=2)
    destinations = {"pacs": FlakyDestination("pacs", 99), "outbox": FlakyDestination("o", 0)}
    deliver_job(job_id, settings, store, destinations=destinations)
    outcome = deliver_job(
        job_id, settings, store, destinations=destinations, now=utc_now() + timedelta(minutes=5)
    )
    assert outcome.state is JobState.FAILED and outcome.retry_in is None
    job = store.get(job_id)
    assert "pacs/seg: PACS said 0xA700" in (job.job.last_error or "")
    assert {d.destination: d.state for d in job.deliveries}["outbox"] is DeliveryState.DELIVERED


def test_a_job_older_than_give_up_after_fails_on_its_next_failure(tmp_path, ready_job):
    store, job_id = ready_job
    settings = settings_for(tmp_path, max_attempts=50)
    settings.dispatch.give_up_after = 5.0
    destinations = {"pacs": FlakyDestination("pacs", 99), "outbox": FlakyDestination("o", 0)}
    outcome = deliver_job(job_id, settings, store, destinations=destinations)
    assert outcome.state is JobState.FAILED  # the next attempt would be past the deadline


def test_an_unconfigured_destination_is_given_up_with_a_reason(tmp_path, ready_job):
    store, job_id = ready_job
    settings = settings_for(tmp_path)
    outcome = deliver_job(
        job_id, settings, store, destinations={"outbox": FlakyDestination("o", 0)}
    )
    assert outcome.state is JobState.FAILED  # nothing to retry: given up at once
    (row,) = [d for d in store.deliveries(job_id) if d.kind is ResultKind.SEG]
    assert row.state is DeliveryState.FAILED
    assert row.last_error == "destination 'pacs' is not configured"


class HangingDestination:
    """A destination that answers only after ``seconds`` (a peer waiting out a timeout)."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name = name
        self.seconds = seconds

    def deliver(self, items):
        import time

        time.sleep(self.seconds)
        return {i.kind: ItemOutcome(False, "association timed out") for i in items}


def test_a_hanging_destination_does_not_hold_up_the_others(tmp_path, ready_job):
    import threading
    import time

    store, job_id = ready_job
    settings = settings_for(tmp_path, max_attempts=5)
    outbox = FlakyDestination("outbox", failures=0)
    destinations = {"pacs": HangingDestination("pacs", 3.0), "outbox": outbox}
    recorded_at: dict[str, float] = {}
    original = store.record_delivery

    def timed(delivery_id, **kwargs):
        row = next(d for d in store.deliveries(job_id) if d.id == delivery_id)
        recorded_at.setdefault(row.destination, time.monotonic())
        return original(delivery_id, **kwargs)

    store.record_delivery = timed
    renewals = []
    store.renew_delivery_leases = lambda ids: renewals.append(list(ids)) or len(ids)
    settings.jobs.lease_timeout = 1.5  # renewed every 0.5 s while the PACS hangs
    started = time.monotonic()
    worker = threading.Thread(
        target=deliver_job, args=(job_id, settings, store), kwargs={"destinations": destinations}
    )
    worker.start()
    worker.join(30)
    assert recorded_at["outbox"] - started < 1.5  # recorded while the PACS still hung
    assert recorded_at["pacs"] - started >= 3.0
    assert len(renewals) >= 3
    rows = {(d.destination, d.kind): d for d in store.deliveries(job_id)}
    assert rows[("outbox", ResultKind.OVERLAY)].state is DeliveryState.DELIVERED
    assert rows[("pacs", ResultKind.SEG)].state is DeliveryState.PENDING
