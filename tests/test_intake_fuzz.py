"""Fuzzing the listener's admission: mutated photos never crash it, hang it, or get through
without their UIDs.

Hypothesis mutates well-formed photos (native RGB and a camera's JPEG) by truncation, byte
flips, inserted bytes and overwritten lengths (0, 0xFFFFFFFF, 0x7FFFFFFF...). Admission must
answer every one with an admitted instance or one of its refusal statuses, within a bounded
time; through a real association the listener must answer every C-STORE with such a status
(never pynetdicom's 0xC211 for a handler that raised) and keep serving.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from dermpacs.config import IntakeSettings, ListenerSettings
from dermpacs.imaging.sopclasses import PHOTO_SOP_CLASSES, VL_PHOTOGRAPHIC_IMAGE
from dermpacs.intake import AdmissionRefused, Quarantine, Spool, StoreStatus, admit
from dermpacs.intake.listener import Listener
from dermpacs.jobs import JobStore, make_engine
from tests import services
from tests.test_reliability_bad_input import body_of, native_photo

REFUSALS = {int(s) for s in StoreStatus if s is not StoreStatus.SUCCESS}
INTERESTING_LENGTHS = [0, 1, 2, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFE]
SECONDS_PER_ADMISSION = 2.0


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        operation = draw(st.sampled_from(["truncate", "flip", "insert", "length", "repeat"]))
        if operation == "truncate":
            del data[at:]
        elif operation == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "length":
            value = draw(st.sampled_from(INTERESTING_LENGTHS))
            data[at : at + 4] = struct.pack("<I", value)
        else:
            end = min(len(data), at + draw(st.integers(1, 64)))
            data[at:at] = data[at:end]
    return bytes(data)


def _native_body() -> tuple[bytes, str]:
    ds = native_photo(8, 10)
    return body_of(ds), str(ds.SOPInstanceUID)


NATIVE_BODY, NATIVE_UID = _native_body()


def _meta_and(body: bytes, uid: str, syntax: str) -> bytes:
    return services.dicom_file_bytes(
        body,
        sop_class_uid=VL_PHOTOGRAPHIC_IMAGE,
        sop_instance_uid=uid,
        transfer_syntax_uid=syntax,
    )


def _admit(encoded: bytes, uid: str, syntax: str) -> None:
    started = time.perf_counter()
    try:
        admitted = admit(
            encoded,
            affected_sop_class_uid=VL_PHOTOGRAPHIC_IMAGE,
            affected_sop_instance_uid=uid,
            transfer_syntax_uid=syntax,
            accepted_sop_classes=PHOTO_SOP_CLASSES,
            max_megapixels=60.0,
        )
    except AdmissionRefused as refusal:
        assert int(refusal.status) in REFUSALS
        assert refusal.reason
    else:
        assert admitted.sop_instance_uid == uid and admitted.rows > 0 and admitted.columns > 0
    assert time.perf_counter() - started < SECONDS_PER_ADMISSION


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_admission_of_a_mutated_native_photo_never_raises_anything_else(data):
    body = data.draw(mutated(NATIVE_BODY))
    _admit(_meta_and(body, NATIVE_UID, ExplicitVRLittleEndian), NATIVE_UID, ExplicitVRLittleEndian)


@pytest.fixture(scope="module")
def camera_body(camera_template: Path) -> tuple[bytes, str, str]:
    ds = dcmread(camera_template)
    raw = camera_template.read_bytes()
    # The data set after the file meta group, as the camera sent it.
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(camera_template)
    return raw[offset:], str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_admission_of_a_mutated_camera_jpeg_never_raises_anything_else(data, camera_body):
    body, uid, syntax = camera_body
    _admit(_meta_and(data.draw(mutated(body)), uid, syntax), uid, syntax)


@pytest.fixture
def listener(tmp_path):
    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}"))
    store.create_schema()
    server = Listener(
        ListenerSettings(ae_title="DERMPACS", host="127.0.0.1", port=0),
        intake=IntakeSettings(max_megapixels=60.0),
        spool=Spool(tmp_path),
        store=store,
        model_version="fuzz",
        on_recorded=lambda job_id, level: None,
        quarantine=Quarantine(tmp_path, max_bytes=2**24),
    )
    server.start()
    yield server
    server.shutdown()
    store.dispose()


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_the_listener_answers_every_mutated_photo_with_a_status_and_goes_on(
    data, listener, tmp_path
):
    body = data.draw(mutated(NATIVE_BODY))
    status, said = services.send_raw(
        listener.port,
        body,
        sop_class_uid=VL_PHOTOGRAPHIC_IMAGE,
        sop_instance_uid=NATIVE_UID,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        folder=tmp_path / "raw",
    )
    assert status is not None, said
    assert status == 0x0000 or status in REFUSALS, f"0x{status:04X} {said}"
    assert services.c_echo(listener.port, called_aet="DERMPACS")
