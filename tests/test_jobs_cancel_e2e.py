"""Cancelling a queued job with the real services: listener, Redis, ``dermpacs worker``.

Two photos are sent while no worker runs; an admin cancels one with ``dermpacs jobs cancel``
while its message waits on Redis; then a worker starts. It takes both messages, skips the
cancelled job without touching it, and delivers the other.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from dermpacs.jobs.models import JobState
from tests import services

QUEUED = JobState.QUEUED

pytestmark = [pytest.mark.integration]


def test_a_job_cancelled_while_queued_is_skipped_by_the_worker(
    tmp_path: Path, plumbing_model: dict, camera_template: Path, own_redis: services.RedisServer
) -> None:
    stack = services.Stack(
        tmp_path,
        model=plumbing_model,
        database_url="",
        broker=own_redis,
        destinations=[{"name": "outbox", "kind": "folder", "path": "outbox"}],
    )
    photos = services.clone_photos(camera_template, tmp_path / "camera", 2)
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in photos]
    store = stack.store()
    try:
        stack.start_listener()
        assert services.send_photos(stack.port, photos) == dict.fromkeys(photos, 0)
        jobs = stack.wait(
            lambda: found if len(found := store.list_jobs(states=[QUEUED])) == 2 else None,
            timeout=30,
            what="both jobs queued",
        )
        by_uid = {j.sop_instance_uid: j.id for j in jobs}
        cancelled, kept = by_uid[uids[0]], by_uid[uids[1]]
        assert own_redis.waiting("inference") == 2  # both messages wait on the broker

        answer = services.jobs_command(
            stack.config, "cancel", str(cancelled), "--reason", "sent by mistake"
        )
        assert answer == [{"job_id": cancelled, "cancelled": True}]
        assert own_redis.waiting("inference") == 2  # a cancel does not touch the queue

        worker = stack.start_worker()
        delivered = stack.wait(
            lambda: (d := store.get(kept)).job.state.value == "delivered" and d,
            timeout=120,
            what=f"job {kept} delivered",
        )
        stack.wait(
            lambda: f"job {cancelled} was cancelled; task skipped" in worker.log(),
            timeout=30,
            what="the worker skipping the cancelled job",
        )
        assert own_redis.waiting("inference") == 0  # its message was consumed

        skipped = store.get(cancelled)
        assert skipped.job.state.value == "cancelled"
        assert skipped.job.attempts == 0  # never claimed
        assert skipped.outputs == () and skipped.deliveries == ()
        assert [e.to_state.value for e in skipped.events] == ["received", "queued", "cancelled"]
        assert skipped.events[-1].reason == "cancelled: sent by mistake"
        assert skipped.events[-1].actor.startswith("admin@cli")
        assert not (stack.root / "results" / str(cancelled)).exists()
        outbox = stack.root / "outbox"
        studies = {p.name for p in outbox.iterdir()}
        assert studies == {delivered.job.study_instance_uid}

        listed = services.jobs_command(stack.config, "list", "--state", "cancelled")
        assert [j["id"] for j in listed] == [cancelled]
    finally:
        stack.stop()
        store.dispose()
