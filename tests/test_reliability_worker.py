"""A worker is SIGKILLed in the middle of a task; the job is redelivered and finishes once.

Two ways a worker dies, each with the broker's own redelivery (the job store's reconciler is
set to wait ten minutes, so it cannot be what saves the job):

* the pool process running the task is killed (the OOM killer, a codec that crashes): the
  worker's main process sees it die and, with ``acks_late`` and ``reject_on_worker_lost``,
  gives the message back to Redis at once; another pool process takes the job over when the
  dead one's lease (``jobs.lease_timeout``) has run out;
* the whole worker is killed (its host died): its message stays unacknowledged in Redis,
  which hands it to the next worker once ``broker.visibility_timeout`` has passed.

Each time the job ends delivered after two attempts, with one SEG, SR and overlay in Orthanc,
each received once. A large photo (1600 x 2400) keeps the task busy long enough to be killed
in the middle.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests import services
from tests.photos import make_img2dcm_photo, skin_photo_rgb
from tests.test_reliability_listener import assert_exactly_one_result_set, pacs_destination

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEASE = 4.0
VISIBILITY = 30


def wait_processing(stack: services.Stack, store, uid: str, timeout: float = 60.0):
    """Wait until the job of ``uid`` is being processed; return it and its holder's PID."""

    def processing():
        jobs = [j for j in store.list_jobs(limit=None) if j.sop_instance_uid == uid]
        if jobs and jobs[0].state.value == "processing":
            detail = store.get(jobs[0].id)
            actor = detail.events[-1].actor  # worker@host:pid of the claim
            return jobs[0], int(actor.rsplit(":", 1)[1])
        return None

    # Polled often: on a fast machine the task may last well under a second.
    try:
        return services.wait_until(
            processing, timeout=timeout, interval=0.02, what=f"job of {uid} processing"
        )
    except TimeoutError:
        return stack.wait(processing, timeout=1, what=f"job of {uid} processing")


def wait_delivered(stack: services.Stack, store, job_id: int, timeout: float):
    return stack.wait(
        lambda: (d := store.get(job_id)).job.state.value == "delivered" and d,
        timeout=timeout,
        what=f"job {job_id} delivered",
    )


@pytest.fixture(scope="module")
def large_photo(tmp_path_factory) -> Path:
    return make_img2dcm_photo(
        tmp_path_factory.mktemp("large"), skin_photo_rgb(1600, 2400, seed=8), quality=85
    )


def test_a_worker_killed_mid_task_has_its_job_redelivered_and_finished_once(
    tmp_path, plumbing_model, large_photo, orthanc, own_redis, postgres_url
):
    stack = services.Stack(
        tmp_path,
        model=plumbing_model,
        database_url=postgres_url,
        broker=own_redis,
        destinations=[pacs_destination(orthanc)],
        overrides={
            "broker": {"url": own_redis.url, "visibility_timeout": VISIBILITY},
            "queues": {
                "inference": {
                    "name": "inference",
                    "concurrency": 1,
                    "time_limit": 20,
                    "retry_delay": 0.5,
                    "retry_delay_max": 4.0,
                },
                "dispatch": {
                    "name": "dispatch",
                    "concurrency": 1,
                    "time_limit": 20,
                    "retry_delay": 0.5,
                    "retry_delay_max": 4.0,
                },
            },
            # The reconciler stays out of it: only the broker can redeliver.
            "jobs": {
                "reconcile_interval": 600.0,
                "received_grace": 600.0,
                "dispatch_grace": 600.0,
                "lease_timeout": LEASE,
            },
        },
    )
    photos = services.clone_photos(large_photo, tmp_path / "camera", 2)
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in photos]
    studies = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in photos}
    store = stack.store()
    try:
        stack.start_listener()
        worker = stack.start_worker()

        # 1. The pool process running the task dies.
        assert services.send_photos(stack.port, photos[:1]) == {photos[0]: 0}
        job, holder = wait_processing(stack, store, uids[0])
        assert holder != worker.pid  # a pool process, not the worker's main process
        os.kill(holder, signal.SIGKILL)
        killed = time.monotonic()
        pool_detail = wait_delivered(stack, store, job.id, timeout=120)
        pool_recovery = time.monotonic() - killed
        assert pool_detail.job.attempts == 2
        assert any("taken over" in e.reason for e in pool_detail.events)
        assert "WorkerLostError" in worker.log()  # rejected and requeued by the worker

        # 2. The whole worker dies; a new one starts.
        assert services.send_photos(stack.port, photos[1:]) == {photos[1]: 0}
        job, holder = wait_processing(stack, store, uids[1])
        worker.kill()  # SIGKILL the process group: main process and pool
        killed = time.monotonic()
        stack.start_worker()
        node_detail = wait_delivered(stack, store, job.id, timeout=VISIBILITY + 120)
        node_recovery = time.monotonic() - killed
        assert node_detail.job.attempts == 2
        # Redis gave the message back only after the visibility timeout.
        assert node_recovery >= VISIBILITY - 2, node_recovery

        stored, duplicates, sent_twice = assert_exactly_one_result_set(orthanc, studies)
        assert duplicates == 0 and sent_twice == 0
        services.record_figures(
            "worker_sigkill_mid_task",
            {
                "photos": 2,
                "pool_process_killed": {
                    "attempts": pool_detail.job.attempts,
                    "delivered_after_kill_s": round(pool_recovery, 1),
                    "lease_timeout_s": LEASE,
                },
                "whole_worker_killed": {
                    "attempts": node_detail.job.attempts,
                    "delivered_after_kill_s": round(node_recovery, 1),
                    "visibility_timeout_s": VISIBILITY,
                },
                "orthanc_instances": stored,
                "duplicates_in_pacs": duplicates,
                "objects_sent_twice": sent_twice,
            },
        )
    finally:
        store.dispose()
        stack.stop()
