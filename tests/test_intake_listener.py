"""The listener over real associations on loopback: what is taken, kept and refused."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dermpacs.config import IntakeSettings, ListenerSettings
from dermpacs.imaging.sopclasses import DERMOSCOPIC_PHOTOGRAPHY_IMAGE, VL_PHOTOGRAPHIC_IMAGE
from dermpacs.intake import Spool
from dermpacs.intake.listener import Listener
from dermpacs.jobs import JobState, JobStore, make_engine
from tests import services
from tests.test_intake_admission import photo

MODEL = "test-model"


class Harness:
    def __init__(self, tmp_path: Path, **listener_args) -> None:
        self.store = JobStore(make_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}"))
        self.store.create_schema()
        self.spool = Spool(tmp_path, min_free_bytes=listener_args.pop("min_free_bytes", 0))
        self.recorded: list[int] = []
        settings = ListenerSettings(ae_title="DERMPACS", host="127.0.0.1", port=0, **listener_args)
        self.listener = Listener(
            settings,
            intake=IntakeSettings(max_megapixels=1.0),
            spool=self.spool,
            store=self.store,
            model_version=MODEL,
            on_recorded=lambda job_id, level: self.recorded.append(job_id),
        )
        self.listener.start()

    def associate(self, contexts, *, calling="CAM1"):
        ae = AE(ae_title=calling)
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, syntaxes)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        return ae.associate("127.0.0.1", self.listener.port, ae_title="DERMPACS")

    def send(self, *datasets, syntaxes=(ExplicitVRLittleEndian,), calling="CAM1"):
        for ds in datasets:
            if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
                _with_syntax(ds, syntaxes[0])
        classes = sorted({ds.SOPClassUID for ds in datasets})
        assoc = self.associate([(c, list(syntaxes)) for c in classes], calling=calling)
        assert assoc.is_established
        try:
            return [assoc.send_c_store(ds) for ds in datasets]
        finally:
            assoc.release()

    def spooled(self) -> list[Path]:
        return sorted(p for p in (self.spool.root).rglob("*.dcm"))

    def close(self) -> None:
        self.listener.shutdown()
        self.store.dispose()


@pytest.fixture(autouse=True)
def _as_the_service_runs(monkeypatch):
    """As `dermpacs listen` runs (quiet_libraries): pynetdicom's standard log handlers
    unbound."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


def jpeg_photo():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 16), (190, 120, 100)).save(buffer, format="JPEG", quality=90)
    ds = photo(16, 32)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True  # encapsulated (PS3.5 A.4)
    ds.LossyImageCompression = "01"
    return ds, buffer.getvalue()


def test_c_echo(harness):
    assoc = harness.associate([(Verification, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_a_jpeg_photo_is_spooled_as_sent_and_recorded_before_success(harness):
    ds, jpeg = jpeg_photo()
    assoc = harness.associate([(VL_PHOTOGRAPHIC_IMAGE, [ExplicitVRLittleEndian, JPEGBaseline8Bit])])
    # the listener chose the compressed syntax although Explicit VR was proposed first
    (context,) = [c for c in assoc.accepted_contexts if c.abstract_syntax == VL_PHOTOGRAPHIC_IMAGE]
    assert context.transfer_syntax[0] == JPEGBaseline8Bit
    status = assoc.send_c_store(_with_syntax(ds, JPEGBaseline8Bit))
    assoc.release()
    assert status.Status == 0x0000
    (spooled,) = harness.spooled()
    stored = dcmread(spooled)
    assert stored.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    # the camera's JPEG bytes are kept, not re-encoded
    assert jpeg in stored.PixelData
    (job,) = harness.store.list_jobs()
    assert job.state is JobState.RECEIVED and job.spool_path == str(spooled)
    assert (job.calling_ae_title, job.transfer_syntax_uid) == ("CAM1", JPEGBaseline8Bit)
    assert harness.recorded == [job.id]


def _with_syntax(ds, syntax):
    from pydicom.dataset import FileMetaDataset

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def test_dermoscopic_photography_is_accepted(harness):
    ds = photo()
    ds.SOPClassUID = DERMOSCOPIC_PHOTOGRAPHY_IMAGE
    (status,) = harness.send(ds)
    assert status.Status == 0x0000


def test_a_photo_sent_twice_is_one_job_and_one_spool_file(harness):
    ds = photo()
    first, second = harness.send(ds, ds)
    (third,) = harness.send(ds)
    assert first.Status == second.Status == third.Status == 0x0000
    assert len(harness.spooled()) == 1
    assert len(harness.store.list_jobs()) == 1
    assert len(harness.recorded) == 1
    assert harness.listener.counters.duplicates == 2


def test_concurrent_associations_all_arrive(harness):
    datasets = [photo() for _ in range(12)]
    results: list[int] = []
    lock = threading.Lock()

    def send(chunk):
        statuses = harness.send(*chunk)
        with lock:
            results.extend(s.Status for s in statuses)

    services.in_threads(send, [datasets[i::4] for i in range(4)], timeout=60)
    assert results == [0] * 12
    assert {j.sop_instance_uid for j in harness.store.list_jobs()} == {
        d.SOPInstanceUID for d in datasets
    }


def test_short_pixel_data_is_refused_with_c000_and_nothing_kept(harness, caplog):
    ds = photo(8, 10, pixel_bytes=60)
    with caplog.at_level(logging.WARNING, logger="dermpacs.intake.listener"):
        (status,) = harness.send(ds)
    assert status.Status == 0xC000
    assert "Pixel Data" in status.ErrorComment
    assert harness.spooled() == [] and harness.store.list_jobs() == []
    assert "refused 0xC000" in caplog.text and ds.SOPInstanceUID in caplog.text
    assert "Doe" not in caplog.text


def test_a_photo_above_the_size_limit_is_refused(harness):
    ds = photo(8, 10)
    ds.Rows, ds.Columns = 1200, 1000  # 1.2 MP over the harness's 1 MP limit
    (status,) = harness.send(ds)
    assert status.Status == 0xC000 and "max_megapixels" in status.ErrorComment


def test_a_full_disk_is_refused_with_a700(tmp_path):
    h = Harness(tmp_path, min_free_bytes=2**62)
    try:
        (status,) = h.send(photo())
        assert status.Status == 0xA700
        assert h.spooled() == [] and h.store.list_jobs() == []
    finally:
        h.close()


def test_a_job_store_failure_is_refused_with_a700_and_the_spool_file_removed(harness):
    def broken(*args, **kwargs):
        raise RuntimeError("database is gone")

    harness.store.record_received = broken  # type: ignore[method-assign]
    (status,) = harness.send(photo())
    assert status.Status == 0xA700
    assert harness.spooled() == []


def test_a_stranger_is_rejected_at_association(tmp_path, caplog):
    h = Harness(tmp_path, allowed_calling_aets=["CAM1"])
    try:
        with caplog.at_level(logging.WARNING, logger="dermpacs.intake.listener"):
            stranger = h.associate([(Verification, [ExplicitVRLittleEndian])], calling="EVIL")
            assert stranger.is_rejected
            known = h.associate([(Verification, [ExplicitVRLittleEndian])], calling="CAM1")
            assert known.is_established
            known.release()
        assert "EVIL" in caplog.text and "allowed_calling_aets" in caplog.text
    finally:
        h.close()


def test_a_resend_of_a_failed_photo_starts_its_job_again(harness):
    ds = photo()
    harness.send(ds)
    (job,) = harness.store.list_jobs()
    harness.store.fail(job.id, "test: give up")
    harness.send(ds)
    assert harness.store.get(job.id).job.state is JobState.RECEIVED
    assert harness.recorded == [job.id, job.id]


def test_the_spool_file_names_the_sender_and_the_listener(harness):
    ds = photo()
    harness.send(ds, calling="WARD7")
    (spooled,) = harness.spooled()
    meta = dcmread(spooled, stop_before_pixels=True).file_meta
    assert meta.SendingApplicationEntityTitle == "WARD7"
    assert meta.ReceivingApplicationEntityTitle == "DERMPACS"
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_every_refused_c_store_is_reported_with_its_status_and_reason(tmp_path):
    reported: list[tuple] = []

    def on_refused(status, reason, *, calling_ae_title, sop_instance_uid):
        reported.append((status, reason, calling_ae_title, sop_instance_uid))

    h = Harness(tmp_path, min_free_bytes=0)
    h.listener.on_refused = on_refused
    try:
        short = photo(8, 10, pixel_bytes=60)
        big = photo(8, 10)
        big.Rows, big.Columns = 1200, 1000
        statuses = h.send(short, big, photo())
    finally:
        h.close()
    assert [s.Status for s in statuses] == [0xC000, 0xC000, 0x0000]
    assert [(r[0], r[2], r[3]) for r in reported] == [
        (0xC000, "CAM1", short.SOPInstanceUID),
        (0xC000, "CAM1", big.SOPInstanceUID),
    ]
    assert "Pixel Data" in reported[0][1] and "max_megapixels" in reported[1][1]


def test_a_failing_refusal_hook_does_not_change_the_answer(harness, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("metrics are gone")

    harness.listener.on_refused = broken
    with caplog.at_level(logging.ERROR, logger="dermpacs.intake.listener"):
        (status,) = harness.send(photo(8, 10, pixel_bytes=60))
    assert status.Status == 0xC000
    assert "could not report a refused C-STORE" in caplog.text


def test_a_large_photo_arrives_intact_spooled_while_it_arrives(tmp_path, monkeypatch):
    """A 1.4 MB photo in 16 KB PDUs (the listener's maximum here; BulkReadSocket reads each
    into one buffer) arrives byte for byte. Each fragment goes to the spool's incoming file as
    it arrives, write-back starting on the way; the handler finds the bytes there and an empty
    in-memory buffer."""
    import numpy as np

    from dermpacs.intake import spool as spool_module
    from dermpacs.intake.arrival import ArrivingDataSet

    started: list[int] = []
    monkeypatch.setattr(
        spool_module, "start_writeback", lambda fd, offset, length: started.append(offset)
    )
    h = Harness(tmp_path, max_pdu_size=16384)
    seen: list[tuple[str, int, int]] = []
    handle_store = h.listener.handle_store

    def look(event):
        data_set = event.request.DataSet
        incoming = data_set.incoming
        seen.append((type(data_set).__name__, len(data_set.getbuffer()), incoming.size))
        return handle_store(event)

    h.listener.handle_store = look  # bound by the server at the next association
    h.listener.shutdown()
    h.listener.start()
    ds = photo(600, 800)
    ds.PixelData = np.random.default_rng(3).integers(0, 256, 600 * 800 * 3, np.uint8).tobytes()
    try:
        (status,) = h.send(ds)
        (spooled,) = h.spooled()
    finally:
        h.close()
    assert status.Status == 0x0000
    ((kind, in_memory, on_disk),) = seen
    assert kind == ArrivingDataSet.__name__ and in_memory == 0
    assert on_disk == spooled.stat().st_size and dcmread(spooled).PixelData == ds.PixelData
    assert len(started) >= 2  # 1.4 MB: write-back began every 512 KiB, before the answer


def test_an_association_aborted_mid_photo_leaves_no_incoming_file(harness):
    """A camera that stops halfway through a photo: its incoming spool file existed while
    the bytes arrived and is gone once the association has ended; nothing is recorded."""
    import time

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    ds = photo(300, 400)
    assoc = harness.associate([(VL_PHOTOGRAPHIC_IMAGE, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = io.BytesIO(encode(ds, False, True))  # explicit VR little endian
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id
    fragments = list(message.encode_msg(context_id, 16384))
    for fragment in fragments[: len(fragments) // 2]:  # the command and half the data set
        assoc.dul.send_pdu(fragment)
    incoming = harness.spool.root / ".incoming"
    deadline = time.monotonic() + 10
    while not list(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(incoming.iterdir()), "no incoming file while the data set arrived"
    assoc.abort()
    while list(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(incoming.iterdir()) == []
    assert harness.spooled() == [] and harness.store.list_jobs() == []


def test_bulk_read_socket_returns_what_arrived_when_the_peer_closes():
    import socket

    from dermpacs.intake.listener import BulkReadSocket

    ours, theirs = socket.socketpair()
    reader = BulkReadSocket.__new__(BulkReadSocket)  # no association needed to read bytes
    reader.socket = ours
    payload = bytes(range(256)) * 1000
    sender = threading.Thread(target=lambda: (theirs.sendall(payload), theirs.close()))
    sender.start()
    try:
        assert bytes(reader.recv(100_000)) == payload[:100_000]
        assert bytes(reader.recv(500_000)) == payload[100_000:]  # closed: the rest only
    finally:
        sender.join()
        ours.close()


def test_the_socket_waits_long_for_data_but_wakes_when_something_is_to_be_sent():
    """ready waits up to wait_for_data for bytes, and returns at once when the DUL queues a
    primitive to send (wake), so a C-STORE response does not wait out the select."""
    import socket
    import time

    from dermpacs.intake.listener import BulkReadSocket

    ours, theirs = socket.socketpair()
    reader = BulkReadSocket.__new__(BulkReadSocket)
    reader.socket, reader._is_connected = ours, True
    reader.wait_for_data = 5.0
    reader.open_wake_pipe()
    try:
        waker = threading.Timer(0.05, reader.wake)
        waker.start()
        started = time.monotonic()
        assert reader.ready is False  # woken: nothing to read
        assert time.monotonic() - started < 2.0
        waker.join()
        theirs.sendall(b"\x04")
        assert reader.ready is True  # bytes to read, after the wake-up was drained
    finally:
        reader.close_wake_pipe()
        ours.close()
        theirs.close()
    assert reader._wake_fds is None


def test_the_reactor_waits_for_a_message_or_a_primitive_instead_of_polling():
    """An empty ReactorQueue asked without blocking waits for its signal: a message put on
    it, or a primitive put on the association's queue (a release request), ends the wait at
    once; with neither it gives up after idle_wait, as an empty queue does."""
    import queue

    from dermpacs.intake.listener import ReactorQueue, SignallingQueue

    signal = threading.Event()
    messages, primitives = ReactorQueue(), SignallingQueue()
    messages.signal = primitives.signal = signal
    messages.idle_wait = 5.0
    for target, item in ((messages, (1, "C-STORE-RQ")), (primitives, "A-RELEASE")):
        putter = threading.Timer(0.05, target.put, args=[item])
        putter.start()
        started = time.monotonic()
        try:
            got = messages.get(block=False)
        except queue.Empty:
            got = None
        assert time.monotonic() - started < 2.0
        assert got == (item if target is messages else None)
        putter.join()
    assert primitives.get(block=False) == "A-RELEASE"
    messages.idle_wait = 0.05
    started = time.monotonic()
    with pytest.raises(queue.Empty):
        messages.get(block=False)
    assert time.monotonic() - started >= 0.04


def test_an_association_ends_promptly_when_its_reactor_waits_for_messages(harness):
    """The acceptor's queues share one signal, and release and abort still end it."""
    from dermpacs.intake.listener import ReactorQueue, SignallingQueue

    assoc = harness.associate([(Verification, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    (served,) = harness.listener.ae.active_associations
    assert isinstance(served.dimse.msg_queue, ReactorQueue)
    assert isinstance(served.dul.to_user_queue, SignallingQueue)
    assert served.dimse.msg_queue.signal is served.dul.to_user_queue.signal
    assert assoc.send_c_echo().Status == 0x0000
    started = time.monotonic()
    assoc.release()
    served.join(5)
    assert not served.is_alive()
    assert time.monotonic() - started < 2.0
    aborted = harness.associate([(Verification, [ExplicitVRLittleEndian])])
    (served,) = harness.listener.ae.active_associations
    aborted.abort()
    served.join(5)
    assert not served.is_alive()


def test_a_port_check_that_connects_and_closes_holds_no_association_slot(tmp_path):
    """Load balancers and monitors check a port by connecting and closing. pynetdicom's
    acceptor then waited acse_timeout (30 s) for an association request that cannot come,
    holding one of max_associations: two checks turned the next camera away."""
    h = Harness(tmp_path, max_associations=2)
    try:
        for _ in range(4):
            socket.create_connection(("127.0.0.1", h.listener.port)).close()
        deadline = time.monotonic() + 5  # far below acse_timeout
        while h.listener.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.02)
        assert h.listener.ae.active_associations == []
        (status,) = h.send(photo())
        assert status.Status == 0x0000
    finally:
        h.close()


def test_associations_leave_no_file_descriptors_behind(harness):
    import os
    import time

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    harness.send(photo())  # first association: pools and caches settle
    before = open_fds()
    for _ in range(5):
        (status,) = harness.send(photo())
        assert status.Status == 0x0000
    deadline = time.monotonic() + 10
    while open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)  # the last association's threads are ending
    assert open_fds() <= before


def test_the_intake_service_records_refusals_for_the_admin_page_and_metrics(tmp_path):
    from dermpacs.config import Settings
    from dermpacs.intake.refusals import RefusalLog
    from dermpacs.intake.service import IntakeService

    settings = Settings.model_validate(
        {"storage": {"root": str(tmp_path)}, "listener": {"port": 0, "host": "127.0.0.1"}}
    )
    service = IntakeService(
        settings, model_version=MODEL, publish_processing=print, publish_dispatch=print
    )
    service.start()
    try:
        short = _with_syntax(photo(8, 10, pixel_bytes=60), ExplicitVRLittleEndian)
        ae = AE(ae_title="CAM9")
        ae.add_requested_context(VL_PHOTOGRAPHIC_IMAGE, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", service.port, ae_title="DERMPACS")
        assert assoc.is_established
        assert assoc.send_c_store(short).Status == 0xC000
        assoc.release()
    finally:
        service.stop()  # writes what the refusal log holds
    log = RefusalLog(make_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}"))
    assert log.counts_by_status() == {0xC000: 1}
    (refusal,) = log.recent()
    assert (refusal.calling_ae_title, refusal.sop_instance_uid) == ("CAM9", short.SOPInstanceUID)
