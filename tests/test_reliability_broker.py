"""Redis dies in the middle of a burst and comes back empty.

The test's own redis-server (no persistence: a crash forgets every queued message) is
SIGKILLed when 15 of 60 photos have been acknowledged. The cameras go on sending: the
listener must go on answering success, because a photo needs only the spool and the job
store to be safe. Five seconds later Redis starts again on the same port, empty. The job
store knows what is unfinished; the listener's reconciler publishes the jobs that never
reached the broker, and, seeing that Redis restarted (its run_id changed), those whose
message Redis forgot. Every photo then ends with exactly one result set in Orthanc.
"""

from __future__ import annotations

import threading
import time

import pytest
from pydicom import dcmread

from tests import services
from tests.test_reliability_listener import assert_exactly_one_result_set, pacs_destination

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BURST = 60
CAMERAS = 3
KILL_AFTER = 15
DOWN_FOR = 5.0


def test_redis_killed_during_a_burst_loses_nothing(
    tmp_path, plumbing_model, camera_template, orthanc, own_redis, postgres_url
):
    photos = services.clone_photos(camera_template, tmp_path / "camera", BURST)
    studies = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in photos}
    stack = services.Stack(
        tmp_path,
        model=plumbing_model,
        database_url=postgres_url,
        broker=own_redis,
        destinations=[pacs_destination(orthanc)],
    )
    store = stack.store()
    try:
        listener = stack.start_listener()
        stack.start_worker()

        answered_at: list[tuple[float, int | None]] = []
        killed_at: list[float] = []
        lock = threading.Lock()

        def kill_redis_mid_burst(path, status) -> None:
            with lock:
                answered_at.append((time.monotonic(), status))
                if sum(1 for _, s in answered_at if s == 0) >= KILL_AFTER and not killed_at:
                    own_redis.kill()
                    killed_at.append(time.monotonic())

        started = time.monotonic()
        statuses = services.send_photos(
            stack.port, photos, associations=CAMERAS, on_status=kill_redis_mid_burst
        )
        assert killed_at, "the burst ended before Redis was killed"
        # The listener went on taking photos while the broker was away.
        assert set(statuses.values()) == {0x0000}, statuses
        during_outage = sum(1 for t, s in answered_at if t > killed_at[0] and s == 0)
        assert during_outage >= BURST - KILL_AFTER - CAMERAS

        time.sleep(max(0.0, DOWN_FOR - (time.monotonic() - killed_at[0])))
        held = store.counts_by_state()  # what only the job store knows now
        assert sum(held.values()) == BURST
        own_redis.start()
        back = time.monotonic()

        exited: dict[int, int | None] = {}  # pid: exit status of each worker that died

        def delivered_under_supervision():
            # kombu can lose a worker whose broker drops while it restores an unacknowledged
            # message ("Unrecoverable error", exit status 1, a known kombu race); deployed,
            # systemd starts it again (Restart=on-failure, deploy/systemd/
            # dermpacs-worker@.service), and so does this test.
            for worker in list(stack.workers):
                if not worker.alive() and worker.pid not in exited:
                    exited[worker.pid] = worker.process.returncode
                    stack.start_worker()
            counts = store.counts_by_state()
            return counts["delivered"] == BURST and counts

        counts = stack.wait(
            delivered_under_supervision, timeout=300, what=f"{BURST} jobs delivered"
        )
        assert all(code != 0 for code in exited.values()), exited  # systemd restarts failures
        recovered = time.monotonic() - back
        assert counts["failed"] == 0
        stack.wait(
            lambda: sum(len(v) for v in orthanc.instances_by_study().values()) >= 3 * BURST,
            timeout=60,
            what="every result in Orthanc",
        )
        stored, duplicates, sent_twice = assert_exactly_one_result_set(orthanc, studies)
        assert duplicates == 0
        assert "broker restarted" in listener.log()
        services.record_figures(
            "redis_killed_mid_burst",
            {
                "photos_sent": BURST,
                "cameras": CAMERAS,
                "acknowledged": sum(1 for s in statuses.values() if s == 0),
                "acknowledged_while_redis_down": during_outage,
                "redis_down_s": round(back - killed_at[0], 1),
                "job_states_while_down": {k.value: v for k, v in held.items() if v},
                "jobs_delivered": counts["delivered"],
                "orthanc_instances": stored,
                "duplicates_in_pacs": duplicates,
                "objects_sent_twice": sent_twice,
                "all_delivered_after_redis_back_s": round(recovered, 1),
                "workers_restarted": len(exited),
                "whole_run_s": round(time.monotonic() - started, 1),
            },
        )
    finally:
        store.dispose()
        stack.stop()
