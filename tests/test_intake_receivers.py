"""Several processes behind the listener's one port (``listener.processes``).

The listening process accepts each connection and hands it to the process serving the fewest
associations (itself included); every C-STORE there is admitted, spooled and recorded as in
the listening process, and its job id comes back to the one publisher. Real associations on
loopback, real spawned processes, the SQLite job store they all write.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from dermpacs.config import Settings
from dermpacs.imaging.sopclasses import VL_PHOTOGRAPHIC_IMAGE
from dermpacs.intake.refusals import RefusalLog
from dermpacs.intake.service import IntakeService
from dermpacs.jobs import JobStore, make_engine
from tests import services
from tests.test_intake_admission import photo as bare_photo
from tests.test_intake_listener import _with_syntax

pytestmark = pytest.mark.integration

MODEL = "test-model"


def photo(*args, **kwargs):
    """A small photograph data set, ready to send (Explicit VR Little Endian)."""
    return _with_syntax(bare_photo(*args, **kwargs), ExplicitVRLittleEndian)


class Published:
    """The publish function handed to the service: which job ids reached the publisher."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, job_id: int, **_kwargs: object) -> None:
        with self.lock:
            self.ids.append(job_id)


@pytest.fixture
def service(tmp_path):
    settings = Settings.model_validate(
        {
            "storage": {"root": str(tmp_path / "var"), "min_free_mb": 0},
            "listener": {"port": 0, "host": "127.0.0.1", "processes": 3},
        }
    )
    published = Published()
    intake = IntakeService(
        settings, model_version=MODEL, publish_processing=published, publish_dispatch=print
    )
    intake.start()
    intake.published = published  # type: ignore[attr-defined]
    try:
        yield intake
    finally:
        intake.stop()


def send(port: int, datasets, *, calling_aet: str = "CAMERA") -> list[int]:
    """One association sending ``datasets``; their statuses."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(VL_PHOTOGRAPHIC_IMAGE, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMPACS")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def wait_for(probe, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


def test_associations_are_spread_over_the_processes_and_every_photo_is_recorded_once(
    service, tmp_path
):
    assert len(service.receivers.pids) == 2
    datasets = [photo(8, 10) for _ in range(24)]
    statuses: list[int] = []
    lock = threading.Lock()

    def camera(chunk):
        result = send(service.port, chunk)
        with lock:
            statuses.extend(result)

    # six cameras at once: at most two associations per process when the load is even
    services.in_threads(camera, [datasets[i::6] for i in range(6)], timeout=60)
    assert statuses == [0] * 24

    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'var' / 'jobs.sqlite3'}"))
    try:
        jobs = store.list_jobs(limit=None)
    finally:
        store.dispose()
    assert sorted(j.sop_instance_uid for j in jobs) == sorted(d.SOPInstanceUID for d in datasets)
    # every job reached the one publisher, once, whichever process recorded it
    wait_for(lambda: len(service.published.ids) >= 24, what="24 jobs published")
    assert sorted(service.published.ids) == sorted(j.id for j in jobs)
    # and every spool file is where its row says
    assert all(os.path.exists(j.spool_path) for j in jobs)
    # the receiving processes served associations: the listening process alone served fewer
    assert service.listener.counters.stored < 24
    assert service.listener.counters.stored > 0


def test_port_checks_leave_the_associations_spread_evenly(service):
    """A monitor's bare TCP port check is handed to a process like any connection; it must
    not count there once it has closed (pynetdicom's acceptor waited 30 s for its association
    request, so the next cameras all went to the other processes)."""
    for _ in range(3):  # one per process, handed out in turn
        socket.create_connection(("127.0.0.1", service.port)).close()
    wait_for(lambda: service.receivers.serving() == [0, 0, 0], timeout=5, what="checks ended")

    ae = AE(ae_title="CAMERA")
    ae.add_requested_context(VL_PHOTOGRAPHIC_IMAGE, [ExplicitVRLittleEndian])
    held = [ae.associate("127.0.0.1", service.port, ae_title="DERMPACS") for _ in range(6)]
    try:
        assert all(a.is_established for a in held)
        assert service.receivers.serving() == [2, 2, 2]
    finally:
        for assoc in held:
            assoc.release()
    wait_for(lambda: service.receivers.serving() == [0, 0, 0], timeout=10, what="all released")


def test_a_refusal_in_a_receiving_process_reaches_the_refusal_log(service, tmp_path):
    short = photo(8, 10, pixel_bytes=60)  # Pixel Data too short: 0xC000
    # Idle processes take new associations in turn: three in a row meet all three.
    for index in range(3):
        bad = photo(8, 10, pixel_bytes=60)
        assert send(service.port, [bad], calling_aet=f"CAM{index}") == [0xC000]
    assert send(service.port, [short], calling_aet="CAM9") == [0xC000]
    service.stop()  # the receiving processes' refusals are handed on, then written
    log = RefusalLog(make_engine(f"sqlite:///{tmp_path / 'var' / 'jobs.sqlite3'}"))
    assert log.counts_by_status() == {0xC000: 4}
    callers = {r.calling_ae_title for r in log.recent()}
    assert callers == {"CAM0", "CAM1", "CAM2", "CAM9"}
    assert service.listener.counters.refused < 4  # some were refused by the others


def test_a_receiving_process_that_dies_is_replaced_and_its_share_served_meanwhile(service):
    before = set(service.receivers.pids)
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: service.receivers.ready_count() == 1, what="the death noticed")
    # until the replacement is ready, associations go to the processes that are left
    for _ in range(4):
        assert send(service.port, [photo(8, 10)]) == [0]
    replaced = wait_for(
        lambda: (set(service.receivers.pids) - before) and service.receivers.ready_count() == 2,
        timeout=60,
        what="a replacement receiving process",
    )
    assert replaced and victim not in service.receivers.pids
    statuses = []
    for _ in range(6):
        statuses += send(service.port, [photo(8, 10)])
    assert statuses == [0] * 6
    wait_for(lambda: len(service.published.ids) >= 10, what="10 jobs published")


@pytest.mark.slow
def test_dermpacs_listen_with_two_processes_queues_every_photo_on_redis(
    tmp_path, plumbing_model, camera_template, own_redis
):
    """The command as a hospital runs it: ``dermpacs listen`` with ``processes = 2``, four
    cameras, Redis; stopped with SIGTERM, it leaves no process behind."""
    photos = services.clone_photos(camera_template, tmp_path / "camera", 40)
    stack = services.Stack(
        tmp_path,
        model=plumbing_model,
        database_url="",
        broker=own_redis,
        destinations=[],
        overrides={"listener": {"processes": 2}},
    )
    try:
        listener = stack.start_listener()
        statuses = services.send_photos(stack.port, photos, associations=4)
        assert set(statuses.values()) == {0}
        store = stack.store()
        try:
            stack.wait(
                lambda: store.counts_by_state().get("queued") == 40,
                timeout=60,
                what="40 jobs queued",
            )
        finally:
            store.dispose()
        assert own_redis.waiting("inference") == 40
        log = listener.log()
        receiver_pids = [
            int(line.rsplit("pid ", 1)[1].rstrip(")"))
            for line in log.splitlines()
            if "receiving process 1 started" in line
        ]
        assert len(receiver_pids) == 1
        served_there = sum(
            1 for line in log.splitlines() if "[receiver 1]" in line and "C-STORE" in line
        )
        assert 0 < served_there < 40
    finally:
        stack.stop()
    # the receiving process went with the listener
    assert not os.path.exists(f"/proc/{receiver_pids[0]}") or _is_zombie(receiver_pids[0])


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_tls_associations_are_served_by_receiving_processes_too(tmp_path, camera_template):
    """The TLS handshake happens in the process that serves the association."""
    from tests.test_security_listener import client_context

    tls = services.TlsFiles(tmp_path / "tls")
    settings = Settings.model_validate(
        {
            "storage": {"root": str(tmp_path / "var"), "min_free_mb": 0},
            "listener": {
                "port": 0,
                "host": "127.0.0.1",
                "processes": 2,
                "tls_port": services.free_port(),
                "tls_certificate": str(tls.server_certificate),
                "tls_private_key": str(tls.server_key),
            },
        }
    )
    published = Published()
    intake = IntakeService(
        settings, model_version=MODEL, publish_processing=published, publish_dispatch=print
    )
    intake.start()
    try:
        photos = services.clone_photos(camera_template, tmp_path / "camera", 4)
        for path in photos:  # one association each: idle processes take them in turn
            statuses = services.send_photos(
                intake.listener.tls_port, [path], tls=client_context(tls)
            )
            assert statuses[path] == 0
        wait_for(lambda: len(published.ids) == 4, what="4 jobs published")
        # the first went to the receiving process (idle processes take turns, it first)
        assert 1 <= intake.listener.counters.stored <= 3
    finally:
        intake.stop()
