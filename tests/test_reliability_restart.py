"""Everything is killed at once and started again: every unfinished job is found and finished.

Forty photos are taken; while the first results are being delivered, the listener, the
worker (main process and pool) and Redis are SIGKILLed together, as a power cut would. The
job store here is the embedded default, SQLite under the storage root (WAL,
``synchronous=FULL``): what was committed survives the kill. Redis comes back empty, then the
worker and the listener; at start-up the listener publishes every unfinished job again, and
the leases of jobs that were being processed or sent run out, so that they are taken over.
Every photo ends with exactly one result set in Orthanc (the PACS is not restarted: it is the
hospital's, and a restart of it is the PACS-down test).
"""

from __future__ import annotations

import time

import pytest
from pydicom import dcmread

from tests import services
from tests.test_reliability_listener import assert_exactly_one_result_set, pacs_destination

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PHOTOS = 40
CAMERAS = 4
KILL_WHEN_DELIVERED = 8


def test_a_restart_of_everything_finds_and_finishes_every_unfinished_job(
    tmp_path, plumbing_model, camera_template, orthanc, own_redis
):
    photos = services.clone_photos(camera_template, tmp_path / "camera", PHOTOS)
    studies = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in photos}
    stack = services.Stack(
        tmp_path,
        model=plumbing_model,
        database_url="",  # SQLite under the storage root
        broker=own_redis,
        destinations=[pacs_destination(orthanc)],
    )
    store = stack.store()
    try:
        listener = stack.start_listener()
        worker = stack.start_worker()
        statuses = services.send_photos(stack.port, photos, associations=CAMERAS)
        assert set(statuses.values()) == {0x0000}

        stack.wait(
            lambda: store.counts_by_state()["delivered"] >= KILL_WHEN_DELIVERED,
            timeout=180,
            what=f"{KILL_WHEN_DELIVERED} jobs delivered",
        )
        for process in (listener, worker):
            process.kill()
        own_redis.kill()
        killed = time.monotonic()
        at_kill = {k.value: v for k, v in store.counts_by_state().items() if v}
        unfinished = PHOTOS - at_kill.get("delivered", 0)
        assert unfinished > 0, at_kill

        own_redis.start()
        stack.start_worker()
        restarted = stack.start_listener()
        counts = stack.wait(
            lambda: (c := store.counts_by_state())["delivered"] == PHOTOS and c,
            timeout=300,
            what=f"{PHOTOS} jobs delivered",
        )
        recovered = time.monotonic() - killed
        assert counts["failed"] == 0
        assert "re-published at start-up" in restarted.log() or "re-published" in restarted.log()
        stack.wait(
            lambda: sum(len(v) for v in orthanc.instances_by_study().values()) >= 3 * PHOTOS,
            timeout=60,
            what="every result in Orthanc",
        )
        stored, duplicates, sent_twice = assert_exactly_one_result_set(orthanc, studies)
        assert duplicates == 0
        services.record_figures(
            "restart_everything",
            {
                "photos_acknowledged": PHOTOS,
                "job_states_at_kill": at_kill,
                "unfinished_at_kill": unfinished,
                "jobs_delivered": counts["delivered"],
                "orthanc_instances": stored,
                "duplicates_in_pacs": duplicates,
                "objects_sent_twice": sent_twice,
                "all_delivered_after_kill_s": round(recovered, 1),
            },
        )
    finally:
        store.dispose()
        stack.stop()
