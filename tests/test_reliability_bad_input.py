"""Malformed and hostile data sets through the real listener (``dermpacs serve``).

Each case is sent as raw bytes over a real association (pynetdicom streams the file's bytes
without parsing them), the way a broken or hostile sender would. Each gets a specific C-STORE
status, is kept in ``storage.root/quarantine`` with a ``.json`` giving the reason, and the
listener answers the next association as if nothing happened. The listener admits from the
header alone; what only decoding finds (a corrupt JPEG) is accepted, then fails in the worker
at once (no retry), and its photo is set aside in the quarantine the same way.

The outcome of every case is recorded in the figures (``DERMPACS_FIGURES_DIR``), from which
the table of docs/reliability.md is written.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from dermpacs.imaging.sopclasses import VL_PHOTOGRAPHIC_IMAGE
from tests import services
from tests.photos import jpeg_bytes, skin_photo_rgb

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MPEG2 = "1.2.840.10008.1.2.4.100"
PATIENT_NAME = "Qwertzuiop^Hostile"
PATIENT_ID = "HOSTILE-4711"
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def native_photo(rows: int = 8, columns: int = 10) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = VL_PHOTOGRAPHIC_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "XC"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.full(rows * columns * 3, 128, dtype=np.uint8).tobytes()
    return ds


def body_of(ds: Dataset) -> bytes:
    """The data set's bytes in Explicit VR Little Endian, without file meta."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return bytes(out.getvalue())


def element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element, with its declared length overridable."""
    declared = len(value) if length is None else length
    head = struct.pack("<HH", group, elem) + vr
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return head + b"\0\0" + struct.pack("<I", declared) + value
    return head + struct.pack("<H", declared) + value


def replace_element(body: bytes, tag: tuple[int, int], new: bytes) -> bytes:
    """``body`` with the (short-VR) element ``tag`` replaced by ``new``."""
    start = body.index(struct.pack("<HH", *tag))
    (length,) = struct.unpack_from("<H", body, start + 6)
    return body[:start] + new + body[start + 8 + length :]


def before(body: bytes, tag: tuple[int, int], inserted: bytes) -> bytes:
    at = body.index(struct.pack("<HH", *tag))
    return body[:at] + inserted + body[at:]


def nested(depth: int, *, undefined: bool) -> bytes:
    """A Content Sequence nested ``depth`` levels deep."""
    inner = b""
    for _ in range(depth):
        if undefined:
            item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + inner + b"\xfe\xff\x0d\xe0\0\0\0\0"
            inner = (
                struct.pack("<HH", 0x0040, 0xA730)
                + b"SQ\0\0\xff\xff\xff\xff"
                + item
                + b"\xfe\xff\xdd\xe0\0\0\0\0"
            )
        else:
            item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(inner)) + inner
            inner = element(0x0040, 0xA730, b"SQ", item)
    return inner


def jpeg_photo(fragment: bytes, rows: int = 64, columns: int = 96) -> Dataset:
    ds = native_photo(rows, columns)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "01"
    return ds


@dataclass
class Case:
    """One malformed input: how it is made and what must happen to it."""

    name: str
    make: Callable[[], tuple[bytes, Dataset]]  # body, and the data set it was made from
    status: int | None  # the C-STORE status; None: no C-STORE possible
    says: str  # in the ErrorComment, the failure reason or what happened
    sop_class: str = VL_PHOTOGRAPHIC_IMAGE
    syntax: str = ExplicitVRLittleEndian
    stage: str = "intake"  # or "processing" (accepted, fails in the worker), or "none"


def _with(change: Callable[[bytes, Dataset], bytes], ds_factory=native_photo):
    def make() -> tuple[bytes, Dataset]:
        ds = ds_factory()
        return change(body_of(ds), ds), ds

    return make


def _jpeg(change: Callable[[bytes], bytes], *, rows=64, columns=96, picture=(64, 96)):
    def make() -> tuple[bytes, Dataset]:
        good = jpeg_bytes(skin_photo_rgb(*picture, seed=3), quality=90)
        ds = jpeg_photo(change(good), rows, columns)
        return body_of(ds), ds

    return make


def _ct() -> Dataset:
    ds = native_photo()
    ds.SOPClassUID = CT_IMAGE
    ds.Modality = "CT"
    return ds


def _evil_uid() -> Dataset:
    ds = native_photo()
    ds.SOPInstanceUID = "../../tmp/evil"
    return ds


def _garbage_jpeg(good: bytes) -> bytes:
    rng = random.Random(7)
    noise = bytes(rng.randrange(256) for _ in range(len(good) - 4))
    return good[:2] + noise.replace(b"\xff", b"\x00") + good[-2:]


CASES = [
    Case(
        "truncated in the header",
        _with(lambda b, ds: b[:70]),
        0xC000,
        "declares",
    ),
    Case(
        "truncated in the pixel data",
        _with(lambda b, ds: b[:-100]),
        0xC000,
        "Pixel Data declares",
    ),
    Case(
        "element length past the end (UN of 256 MiB)",
        _with(
            lambda b, ds: before(
                b, (0x0020, 0x000D), element(0x0011, 0x1010, b"UN", b"x" * 8, 2**28)
            )
        ),
        0xC000,
        "declares 268435456 bytes",
    ),
    Case(
        "wrong length: Rows (US) of 3 bytes",
        _with(
            lambda b, ds: replace_element(
                b, (0x0028, 0x0010), element(0x0028, 0x0010, b"US", b"\x08\0\0")
            )
        ),
        0xC000,
        "BytesLengthException",
    ),
    Case(
        "pixel data shorter than Rows x Columns x 3",
        _with(
            lambda b, ds: (
                b[: b.index(PIXEL_DATA_TAG)] + element(0x7FE0, 0x0010, b"OB", b"\x80" * 60)
            )
        ),
        0xC000,
        "Pixel Data has 60 bytes",
    ),
    Case(
        "huge Rows x Columns (65535 x 65535)",
        _with(
            lambda b, ds: replace_element(
                replace_element(b, (0x0028, 0x0010), element(0x0028, 0x0010, b"US", b"\xff\xff")),
                (0x0028, 0x0011),
                element(0x0028, 0x0011, b"US", b"\xff\xff"),
            )
        ),
        0xC000,
        "max_megapixels",
    ),
    Case(
        "CT image on a VL Photographic context",
        _with(lambda b, ds: b, _ct),
        0xA900,
        "differs from the request",
    ),
    Case(
        "CT image proposed as CT",
        _with(lambda b, ds: b, _ct),
        None,
        "presentation context rejected",
        sop_class=CT_IMAGE,
        stage="none",
    ),
    Case(
        "unsupported transfer syntax (MPEG2)",
        _with(lambda b, ds: b),
        None,
        "presentation context rejected",
        syntax=MPEG2,
        stage="none",
    ),
    Case(
        "native bytes on a JPEG Baseline context",
        _with(lambda b, ds: b),
        0xC000,
        "not encapsulated",
        syntax=JPEGBaseline8Bit,
    ),
    Case(
        "sequences nested 40 deep (defined lengths)",
        _with(lambda b, ds: before(b, (0x7FE0, 0x0010), nested(40, undefined=False))),
        0xC000,
        "nested deeper than 16",
    ),
    Case(
        "sequences nested 5000 deep (undefined lengths)",
        _with(lambda b, ds: before(b, (0x7FE0, 0x0010), nested(5000, undefined=True))),
        0xC000,
        "",  # the parser's recursion limit or the nesting rule, whichever comes first
    ),
    Case(
        "zero-length Rows",
        _with(
            lambda b, ds: replace_element(b, (0x0028, 0x0010), element(0x0028, 0x0010, b"US", b""))
        ),
        0xA900,
        "Rows missing or not positive",
    ),
    Case(
        "zero-length SOP Instance UID",
        _with(
            lambda b, ds: replace_element(b, (0x0008, 0x0018), element(0x0008, 0x0018, b"UI", b""))
        ),
        0xA900,
        "SOP Instance UID differs",
    ),
    Case(
        "zero-length Pixel Data",
        _with(lambda b, ds: b[: b.index(PIXEL_DATA_TAG)] + element(0x7FE0, 0x0010, b"OB", b"")),
        0xC000,
        "Pixel Data has 0 bytes",
    ),
    Case(
        "wrong VR: Rows as LO 'abc'",
        _with(
            lambda b, ds: replace_element(
                b, (0x0028, 0x0010), element(0x0028, 0x0010, b"LO", b"abc ")
            )
        ),
        0xA900,
        "Rows missing or not positive",
    ),
    Case(
        "wrong VR: Study Instance UID as US",
        _with(
            lambda b, ds: replace_element(
                b, (0x0020, 0x000D), element(0x0020, 0x000D, b"US", b"\x01\x00")
            )
        ),
        0xA900,
        "StudyInstanceUID missing or not a UID",
    ),
    Case(
        "SOP Instance UID '../../tmp/evil' (not a UID)",
        _with(lambda b, ds: b, _evil_uid),
        0xA900,
        "SOPInstanceUID missing or not a UID",
    ),
    Case(
        "not DICOM at all (random bytes)",
        lambda: (random.Random(3).randbytes(4096), native_photo()),
        0xC000,
        "",
    ),
    Case(
        "corrupt JPEG bitstream (header fine)",
        _jpeg(_garbage_jpeg),
        0x0000,
        "PhotographError",
        syntax=JPEGBaseline8Bit,
        stage="processing",
    ),
    Case(
        "JPEG cut in half (item length consistent)",
        _jpeg(lambda good: good[: len(good) // 2]),
        0x0000,
        "PhotographError",
        syntax=JPEGBaseline8Bit,
        stage="processing",
    ),
    Case(
        "JPEG of 32 x 48 where the header says 64 x 96",
        _jpeg(lambda good: good, picture=(32, 48)),
        0x0000,
        "PhotographError",
        syntax=JPEGBaseline8Bit,
        stage="processing",
    ),
]


def sop_instance_of(body: bytes, ds: Dataset) -> str:
    return str(ds.SOPInstanceUID)


def test_malformed_and_hostile_data_sets_are_refused_kept_and_the_listener_goes_on(
    tmp_path, plumbing_model, camera_template
):
    port = services.free_port()
    root = tmp_path / "var"
    config = services.write_toml(
        tmp_path / "dermpacs.toml",
        {
            "listener": {"ae_title": "DERMPACS", "host": services.LOOPBACK, "port": port},
            "storage": {"root": str(root), "min_free_mb": 0},
            "model": plumbing_model,
            "crops": {"max_crops": 1},
            "jobs": {"reconcile_interval": 2.0, "received_grace": 2.0},
            "destinations": [{"name": "outbox", "kind": "folder", "path": "outbox"}],
        },
    )
    serve = services.dermpacs_process("serve", config, log_path=tmp_path / "serve.log")
    rows = []
    try:
        services.wait_until(
            lambda: services.c_echo(port, called_aet="DERMPACS"), timeout=90, what="listener"
        )
        store = services.open_job_store(f"sqlite:///{(root / 'jobs.sqlite3').resolve()}")
        try:
            for case in CASES:
                body, ds = case.make()
                uid = sop_instance_of(body, ds)
                status, said = services.send_raw(
                    port,
                    body,
                    sop_class_uid=case.sop_class,
                    sop_instance_uid=uid,
                    transfer_syntax_uid=case.syntax,
                    folder=tmp_path / "raw",
                )
                row = {
                    "case": case.name,
                    "status": None if status is None else f"0x{status:04X}",
                    "said": said,
                    "stage": case.stage,
                }
                assert status == case.status, (case.name, status, said)
                assert case.says in said or case.stage == "processing", (case.name, said)
                # The listener answers the next association at once.
                assert services.c_echo(port, called_aet="DERMPACS"), case.name
                if case.stage == "processing":
                    job = services.wait_until(
                        lambda uid=uid: next(
                            (
                                j
                                for j in store.list_jobs(limit=None)
                                if j.sop_instance_uid == uid and j.state.value == "failed"
                            ),
                            None,
                        ),
                        timeout=120,
                        what=f"{case.name}: job failed",
                    )
                    assert case.says in (job.last_error or ""), (case.name, job.last_error)
                    assert job.attempts == 1, (case.name, job.attempts)  # not retried
                    row["said"] = f"accepted; job failed: {job.last_error}"
                rows.append(row)
        finally:
            store.dispose()

        # Every refused or failed case is in the quarantine, with its reason beside it.
        kept = {}
        for reason_file in sorted((root / "quarantine").rglob("*.json")):
            reason = json.loads(reason_file.read_text())
            assert reason_file.with_suffix(".dcm").is_file()
            kept[reason["sop_instance_uid"]] = reason
        for case, row in zip(CASES, rows, strict=True):
            if case.stage == "none":
                row["quarantined"] = "no (nothing was sent)"
                continue
            matching = [r for r in kept.values() if r["reason"] and case.says in r["reason"]]
            assert matching, (case.name, "not in the quarantine")
            row["quarantined"] = "yes"
        intake_reasons = [r for r in kept.values() if r["stage"] == "intake"]
        assert len(intake_reasons) == sum(1 for c in CASES if c.stage == "intake")
        assert all(r["status"] == int(r["status_hex"], 16) for r in intake_reasons)
        # Nothing of the sender's names reached a file name.
        assert all(".." not in p.name for p in (root / "quarantine").rglob("*"))

        # And the listener still takes, and the worker still processes, a good photo.
        (good,) = services.clone_photos(camera_template, tmp_path / "good", 1)
        assert services.send_photos(port, [good]) == {good: 0x0000}
        study = str(dcmread(good, stop_before_pixels=True).StudyInstanceUID)
        services.wait_until(
            lambda: len(list((root / "outbox" / study).glob("*.dcm"))) == 3,
            timeout=120,
            what="the good photo's results",
        )
        log = serve.log()
        assert PATIENT_NAME.split("^")[0] not in log and PATIENT_ID not in log
        for reason_file in (root / "quarantine").rglob("*.json"):
            text = reason_file.read_text()
            assert PATIENT_NAME.split("^")[0] not in text and PATIENT_ID not in text
        services.record_figures("bad_input", {"cases": rows})
    finally:
        serve.stop(timeout=60)
