"""Redis loses the queued messages without restarting (FLUSHDB, eviction under maxmemory).

Redis's run_id does not change, so the listener's restart check cannot see it: the jobs stay
``queued`` with no message anywhere. The reconciler asks the broker how many processing
messages it holds (waiting in any priority list, or taken and not acknowledged); when none
while jobs have been queued for longer than the grace, it publishes them again, and a worker
started afterwards processes every one exactly once.
"""

from __future__ import annotations

import pytest
from pydicom import dcmread

from dermpacs.jobs.models import JobState
from tests import services

pytestmark = [pytest.mark.integration]

QUEUED, DELIVERED = JobState.QUEUED, JobState.DELIVERED


def test_queued_jobs_whose_messages_vanished_are_published_again(
    tmp_path, plumbing_model, camera_template, own_redis, caplog
):
    stack = services.Stack(
        tmp_path,
        model=plumbing_model,
        database_url=f"sqlite:///{tmp_path / 'jobs.sqlite3'}",
        broker=own_redis,
        destinations=[{"name": "outbox", "kind": "folder", "path": "outbox"}],
    )
    photos = services.clone_photos(camera_template, tmp_path / "camera", 3)
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in photos}
    store = stack.store()
    try:
        stack.start_listener()
        assert services.send_photos(stack.port, photos) == dict.fromkeys(photos, 0)
        stack.wait(
            lambda: len(store.list_jobs(states=[QUEUED])) == 3 or None,
            timeout=30,
            what="three jobs queued",
        )
        assert own_redis.waiting("inference") == 3
        own_redis.client().flushdb()  # the messages are gone; Redis itself never restarted
        # reconcile_interval 2 s, received_grace 2 s: within a few passes they are back
        stack.wait(
            lambda: own_redis.waiting("inference") == 3 or None,
            timeout=30,
            what="messages published",
        )
        assert "held no processing message" in stack.listeners[0].log()

        stack.start_worker()
        jobs = stack.wait(
            lambda: found if len(found := store.list_jobs(states=[DELIVERED])) == 3 else None,
            timeout=120,
            what="three jobs delivered",
        )
        assert {j.sop_instance_uid for j in jobs} == uids
        assert all(j.attempts == 1 for j in jobs)  # each processed once
    finally:
        stack.stop()
