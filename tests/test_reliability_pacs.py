"""The PACS is down for a while; another destination stays down for good.

Two destinations: ``pacs`` (Orthanc, stopped when the photos arrive, started again ten
seconds after the first results found it down) and ``archive`` (a peer that accepts the TCP
connection and never answers, so that every attempt waits out the association timeout).
The results wait in the outbox and are retried with exponential backoff and jitter; they
reach the PACS once it is back, while the archive still hangs. When
``dispatch.give_up_after`` has passed, the jobs fail, visible in ``dermpacs jobs list --state
failed``; an admin starts an archive on that port and runs ``dermpacs jobs retry``: only the
archive's objects are sent, and the jobs are delivered.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict

import pytest
from pydicom import dcmread

from tests import services
from tests.test_reliability_listener import pacs_destination

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PHOTOS = 3
PACS_DOWN_FOR = 10.0
GIVE_UP_AFTER = 30.0
RETRY_DELAY = 1.0
RETRY_DELAY_MAX = 4.0
_RETRY_LINE = re.compile(
    r"job (\d+): (seg|sr|overlay) to (\w+) failed \(attempt (\d+)\): .*; retry in ([0-9.]+) s"
)


def retry_delays(log: str, destination: str) -> dict[int, list[tuple[int, float]]]:
    """Per job, the (attempt, delay) pairs logged for ``destination``'s SEG."""
    delays: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for job, kind, name, attempt, delay in _RETRY_LINE.findall(log):
        if name == destination and kind == "seg":
            delays[int(job)].append((int(attempt), float(delay)))
    return delays


def test_results_wait_for_a_pacs_that_is_down_and_a_dead_destination_blocks_nothing(
    tmp_path, plumbing_model, camera_template, orthanc, own_redis, postgres_url
):
    archive = services.BlackHole()
    warm_up, *photos = services.clone_photos(camera_template, tmp_path / "camera", PHOTOS + 1)
    studies = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in photos}
    stack = services.Stack(
        tmp_path,
        model=plumbing_model,
        database_url=postgres_url,
        broker=own_redis,
        destinations=[
            pacs_destination(orthanc),
            {
                "name": "archive",
                "kind": "dicom",
                "ae_title": "ARCHIVE",
                "host": services.LOOPBACK,
                "port": archive.port,
            },
        ],
        overrides={
            "queues": {
                "inference": {"name": "inference", "concurrency": 1, "time_limit": 60},
                "dispatch": {
                    "name": "dispatch",
                    "concurrency": 2,
                    "time_limit": 60,
                    "max_attempts": 100,
                    "retry_delay": RETRY_DELAY,
                    "retry_delay_max": RETRY_DELAY_MAX,
                },
            },
            "dispatch": {
                "acse_timeout": 1.0,
                "dimse_timeout": 10.0,
                "network_timeout": 5.0,
                "give_up_after": GIVE_UP_AFTER,
            },
        },
    )
    store = stack.store()
    archive_pacs = None
    try:
        stack.start_listener()
        # Processing and delivery in workers of their own, so that the inference worker can
        # load its models (a warm-up photo) before the PACS goes down: dispatch.give_up_after
        # then counts delivery time, not how long a loaded machine takes to import torch.
        stack.start_worker("--queues", "inference")
        worker = stack.start_worker("--queues", "dispatch")
        assert services.send_photos(stack.port, [warm_up]) == {warm_up: 0}
        stack.wait(
            lambda: (
                store.counts_by_state()["processing"] + store.counts_by_state()["queued"] == 0
                and store.counts_by_state()["received"] == 0
            ),
            timeout=120,
            what="the warm-up photo processed",
        )
        orthanc.stop()  # the PACS is down when the photos arrive
        warm_up_jobs = {j.id for j in store.list_jobs(limit=None)}
        sent = time.monotonic()
        assert set(services.send_photos(stack.port, photos).values()) == {0x0000}

        def photo_jobs():
            return [j for j in store.list_jobs(limit=None) if j.id not in warm_up_jobs]

        def waiting_in_outbox():
            jobs = photo_jobs()
            if len(jobs) < PHOTOS or any(j.state.value != "results_ready" for j in jobs):
                return None
            rows = [d for j in jobs for d in store.deliveries(j.id) if d.destination == "pacs"]
            return rows if min(d.attempts for d in rows) >= 1 else None

        stack.wait(waiting_in_outbox, timeout=120, what="results waiting for the PACS")
        time.sleep(PACS_DOWN_FOR)
        attempts_while_down = max(d.attempts for j in photo_jobs() for d in store.deliveries(j.id))
        orthanc.start()
        back = time.monotonic()

        def pacs_has_everything():
            rows = [
                d for j in photo_jobs() for d in store.deliveries(j.id) if d.destination == "pacs"
            ]
            return all(d.state.value == "delivered" for d in rows) and rows

        stack.wait(pacs_has_everything, timeout=60, what="every object delivered to the PACS")
        pacs_recovery = time.monotonic() - back
        # The archive still hangs: its rows are pending, and did not hold the PACS up.
        archive_rows = [
            d for j in photo_jobs() for d in store.deliveries(j.id) if d.destination == "archive"
        ]
        assert {d.state.value for d in archive_rows} <= {"pending", "sending"}
        held = orthanc.instances_by_study()
        assert studies <= set(held) and all(len(v) == 3 for v in held.values())

        # The warm-up job fails too (the archive never had it): retried below with the rest.
        stack.wait(
            lambda: store.counts_by_state()["failed"] == PHOTOS + 1,
            timeout=GIVE_UP_AFTER + 60,
            what="jobs failed after dispatch.give_up_after",
        )
        failed_after = time.monotonic() - sent
        failed = services.jobs_command(stack.config, "list", "--state", "failed")
        assert len(failed) == PHOTOS + 1
        assert all("archive" in j["last_error"] for j in failed), failed

        # Exponential backoff with jitter, read from the worker's log lines.
        delays = retry_delays(worker.log(), "pacs")
        firsts = [dict(pairs).get(1) for pairs in delays.values()]
        for pairs in delays.values():
            for attempt, delay in pairs:
                ceiling = min(RETRY_DELAY_MAX, RETRY_DELAY * 2 ** (attempt - 1))
                assert ceiling / 2 - 0.05 <= delay <= ceiling + 0.05, (attempt, delay)
        assert len({d for d in firsts if d is not None}) > 1  # jitter: not all in step

        # An admin brings the archive up and retries the failed jobs.
        archive.close()
        archive_pacs = services.Orthanc(
            tmp_path / "archive", aet="ARCHIVE", dicom_port=archive.port
        ).start()
        retried = services.jobs_command(stack.config, "retry", *[str(j["id"]) for j in failed])
        assert all(r["retried"] and r["stage"] == "dispatch" for r in retried), retried
        stack.wait(
            lambda: store.counts_by_state()["delivered"] == PHOTOS + 1,
            timeout=90,
            what="retried jobs delivered",
        )
        archived = archive_pacs.instances_by_study()
        assert studies <= set(archived) and len(archived) == PHOTOS + 1
        assert all(len(v) == 3 for v in archived.values())
        # Only the archive's objects were sent again; the PACS got each object once.
        assert set(orthanc.received_counts().values()) == {1}
        assert len(orthanc.received_counts()) == 3 * (PHOTOS + 1)
        services.record_figures(
            "pacs_down",
            {
                "photos": PHOTOS,
                "pacs_down_s": round(back - sent, 1),
                "pacs_attempts_while_down_max": attempts_while_down,
                "pacs_delivered_after_return_s": round(pacs_recovery, 1),
                "archive_connections_while_hanging": archive.connections,
                "jobs_failed_after_s": round(failed_after, 1),
                "give_up_after_s": GIVE_UP_AFTER,
                "retry_delays_s": {
                    str(job): [round(d, 1) for _, d in pairs] for job, pairs in delays.items()
                },
                "pacs_objects_received": sum(orthanc.received_counts().values()),
                "archive_objects_after_admin_retry": sum(len(v) for v in archived.values()),
                "note": "one more photo, a warm-up sent while the PACS was up, is counted in "
                "the archive and PACS figures",
            },
        )
    finally:
        store.dispose()
        stack.stop()
        archive.close()
        if archive_pacs is not None:
            archive_pacs.stop()
