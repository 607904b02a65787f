"""The listener is SIGKILLed in the middle of a burst, then started again.

Six cameras (pynetdicom associations) send 120 photos at once. When 40 have been answered
with success, the listener's process group is killed. The cameras' associations die with it;
what they got no answer for they send again once the listener is back, as a camera would,
together with a few photos that had been acknowledged (a camera that retries too eagerly).
Every photo must end with exactly one SEG, one SR and one overlay in Orthanc, each sent to it
once.

Real parts: ``dermpacs listen`` and ``dermpacs worker`` processes, a redis-server of the
test's own, PostgreSQL, Orthanc. Plumbing weights: the networks are untrained (the fault is
in the plumbing, not the method). ``DERMPACS_FIGURES_DIR=... pytest -s`` keeps the figures.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests import services

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BURST = 120
CAMERAS = 6
KILL_AFTER = 40
RESENT_ACKNOWLEDGED = 5


def pacs_destination(orthanc: services.Orthanc) -> dict:
    return {
        "name": "pacs",
        "kind": "dicom",
        "ae_title": orthanc.aet,
        "host": services.LOOPBACK,
        "port": orthanc.dicom_port,
    }


def assert_exactly_one_result_set(
    orthanc: services.Orthanc, studies: set[str]
) -> tuple[int, int, int]:
    """Every study has one SEG, one SR and one overlay, each received once.

    Returns (instances stored, duplicates stored, objects received more than once).
    """
    held = orthanc.instances_by_study()
    assert set(held) == studies, "Orthanc holds other studies, or misses some"
    stored = 0
    for study, instances in held.items():
        modalities = sorted(i["modality"] for i in instances)
        assert len(instances) == 3 and modalities.count("SEG") == 1, (study, modalities)
        assert modalities.count("SR") == 1, (study, modalities)
        stored += len(instances)
    received = orthanc.received_counts()
    resent = sum(1 for count in received.values() if count > 1)
    return stored, stored - 3 * len(studies), resent


def test_listener_killed_mid_burst_loses_nothing_and_duplicates_nothing(
    tmp_path, plumbing_model, camera_template, orthanc, own_redis, postgres_url
):
    photos = services.clone_photos(camera_template, tmp_path / "camera", BURST)
    studies = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in photos}
    uid_of = {p: str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in photos}
    stack = services.Stack(
        tmp_path,
        model=plumbing_model,
        database_url=postgres_url,
        broker=own_redis,
        destinations=[pacs_destination(orthanc)],
    )
    try:
        listener = stack.start_listener()
        stack.start_worker()

        acknowledged: list[Path] = []
        killed_at: list[float] = []
        lock = threading.Lock()

        def kill_mid_burst(path: Path, status: int | None) -> None:
            with lock:
                if status == 0x0000:
                    acknowledged.append(path)
                if len(acknowledged) >= KILL_AFTER and not killed_at:
                    listener.kill()  # SIGKILL the listener's process group
                    killed_at.append(time.monotonic())

        started = time.monotonic()
        first = services.send_photos(
            stack.port, photos, associations=CAMERAS, on_status=kill_mid_burst
        )
        assert killed_at, "the burst ended before the listener was killed"
        answered = [p for p, s in first.items() if s == 0x0000]
        refused = {p: s for p, s in first.items() if s not in (None, 0x0000)}
        unanswered = [p for p, s in first.items() if s is None]
        assert refused == {}
        assert len(answered) >= KILL_AFTER and unanswered, (len(answered), len(unanswered))

        stack.start_listener()
        back_after = time.monotonic() - killed_at[0]
        store = stack.store()
        try:
            # Photos that reached the job store although their answer never left.
            known = {j.sop_instance_uid for j in store.list_jobs(limit=None)}
            stored_unanswered = sum(1 for p in unanswered if uid_of[p] in known)
            assert {uid_of[p] for p in answered} <= known  # every acknowledged one is kept

            resend = unanswered + answered[:RESENT_ACKNOWLEDGED]
            second = services.send_photos(stack.port, resend, associations=CAMERAS)
            assert set(second.values()) == {0x0000}, second

            def all_delivered():
                counts = store.counts_by_state()
                return counts if counts["delivered"] == BURST else None

            counts = stack.wait(all_delivered, timeout=300, what=f"{BURST} jobs delivered")
            took = time.monotonic() - started
            jobs = store.list_jobs(limit=None)
        finally:
            store.dispose()
        assert len(jobs) == BURST and counts["failed"] == 0
        assert {j.sop_instance_uid for j in jobs} == set(uid_of.values())

        def results_settled():
            held = orthanc.instances_by_study()
            return held if sum(len(v) for v in held.values()) >= 3 * BURST else None

        stack.wait(results_settled, timeout=60, what="every result in Orthanc")
        stored, duplicates, resent_on_wire = assert_exactly_one_result_set(orthanc, studies)
        assert duplicates == 0
        assert resent_on_wire == 0  # dispatch was not interrupted: each object sent once
        services.record_figures(
            "listener_sigkill_mid_burst",
            {
                "photos_sent": BURST,
                "cameras": CAMERAS,
                "acknowledged_before_kill": len(answered),
                "unanswered_at_kill": len(unanswered),
                "unanswered_but_already_stored": stored_unanswered,
                "resent": len(resend),
                "resent_acknowledged": sum(1 for s in second.values() if s == 0),
                "jobs": len(jobs),
                "jobs_delivered": counts["delivered"],
                "max_processing_attempts": max(j.attempts for j in jobs),
                "orthanc_instances": stored,
                "duplicates_in_pacs": duplicates,
                "objects_sent_twice": resent_on_wire,
                "listener_back_after_s": round(back_after, 1),
                "all_delivered_after_s": round(took, 1),
            },
        )
    finally:
        stack.stop()
