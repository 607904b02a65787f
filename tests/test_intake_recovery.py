"""Spool recovery: a job row lost after its photo was spooled is recorded again at start-up.

The listener commits job rows lazily (the fsync'd spool file makes the photo durable), so a
power cut can take the newest rows; these tests take them by deleting rows, which is what
the database looks like after such a cut.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import delete

from dermpacs.config import Settings
from dermpacs.intake import Spool
from dermpacs.intake.recovery import recover_spooled
from dermpacs.intake.service import IntakeService
from dermpacs.jobs import JobState, JobStore, make_engine
from dermpacs.jobs.models import Job, JobEvent
from tests.test_intake_admission import photo
from tests.test_intake_listener import MODEL, Harness


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


def lose_rows(store: JobStore, job_ids: list[int]) -> None:
    with store.engine.begin() as connection:
        connection.execute(delete(JobEvent).where(JobEvent.job_id.in_(job_ids)))
        connection.execute(delete(Job).where(Job.id.in_(job_ids)))


def test_spool_files_whose_rows_were_lost_become_jobs_again(harness):
    sent = [photo() for _ in range(3)]
    harness.send(*sent, calling="WARD7")
    jobs = sorted(harness.store.list_jobs(), key=lambda j: j.id)
    kept, *lost = jobs
    lose_rows(harness.store, [j.id for j in lost])

    result = recover_spooled(harness.store, harness.spool, model_version=MODEL)

    assert len(result.recovered) == 2 and result.examined == 2 and result.unreadable == []
    recovered = {j.sop_instance_uid: j for j in harness.store.list_jobs() if j.id != kept.id}
    assert set(recovered) == {j.sop_instance_uid for j in lost}
    for before in lost:
        after = recovered[before.sop_instance_uid]
        assert after.state is JobState.RECEIVED
        assert after.calling_ae_title == "WARD7"  # from the spool file's meta (0002,0017)
        assert (after.study_instance_uid, after.spool_path) == (
            before.study_instance_uid,
            before.spool_path,
        )
    # nothing is lost twice: a second pass finds every file named by a job
    again = recover_spooled(harness.store, harness.spool, model_version=MODEL)
    assert again.recovered == [] and again.examined == 0


def test_a_recovered_job_gets_the_level_its_rules_choose(harness):
    from dermpacs.config import QueuesSettings
    from dermpacs.intake.priority import PriorityRules

    harness.send(photo(), calling="ER_CAM1")
    harness.send(photo(), calling="WARD7")
    lose_rows(harness.store, [j.id for j in harness.store.list_jobs()])
    queues = QueuesSettings.model_validate(
        {"rules": [{"level": "urgent", "calling_ae_title": "ER_*"}]}
    )
    result = recover_spooled(
        harness.store,
        harness.spool,
        model_version=MODEL,
        priority_rules=PriorityRules.from_settings(queues),
    )
    assert len(result.recovered) == 2
    levels = {j.calling_ae_title: j.priority for j in harness.store.list_jobs()}
    assert levels == {"ER_CAM1": "urgent", "WARD7": "normal"}


def test_a_damaged_spool_file_is_reported_and_left_alone(harness, caplog):
    harness.send(photo())
    (job,) = harness.store.list_jobs()
    damaged = Path(job.spool_path).with_name("1.2.3.damaged.dcm")
    damaged.write_bytes(b"not DICOM at all")
    result = recover_spooled(harness.store, harness.spool, model_version=MODEL)
    assert result.unreadable == [damaged] and result.recovered == []
    assert damaged.exists() and "cannot be read" in caplog.text


def test_files_older_than_the_newest_row_by_more_than_the_window_are_not_read(harness):
    first, second = photo(), photo()
    harness.send(first)
    (old,) = harness.store.list_jobs()
    lose_rows(harness.store, [old.id])
    an_hour_ago = Path(old.spool_path).stat().st_mtime - 3600
    os.utime(old.spool_path, (an_hour_ago, an_hour_ago))
    harness.send(second)
    result = recover_spooled(harness.store, harness.spool, model_version=MODEL)
    assert result.examined == 0 and result.recovered == []


def test_an_empty_store_reads_the_whole_spool(harness):
    harness.send(photo(), photo())
    lose_rows(harness.store, [j.id for j in harness.store.list_jobs()])
    result = recover_spooled(harness.store, harness.spool, model_version=MODEL)
    assert len(result.recovered) == 2


def test_intake_start_up_recovers_then_publishes(tmp_path):
    settings = Settings.model_validate(
        {"storage": {"root": str(tmp_path)}, "listener": {"port": 0, "host": "127.0.0.1"}}
    )
    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}"))
    store.create_schema()
    sender = Harness(tmp_path / "first")
    try:
        sender.send(photo())
        (job,) = sender.store.list_jobs()
    finally:
        sender.close()
    # the photo's spool file is in this service's spool, its row is not in its store
    spool = Spool(tmp_path)
    target = spool.root / Path(job.spool_path).parent.name / Path(job.spool_path).name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(job.spool_path, target)
    published: list[int] = []
    service = IntakeService(
        settings,
        model_version=MODEL,
        publish_processing=published.append,
        publish_dispatch=published.append,
        store=store,
    )
    service.start()
    try:
        (recovered,) = store.list_jobs()
        assert recovered.sop_instance_uid == job.sop_instance_uid
        assert published == [recovered.id]
        assert store.get(recovered.id).job.state is JobState.QUEUED
    finally:
        service.stop()
