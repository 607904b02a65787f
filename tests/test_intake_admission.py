"""Admission from the header alone, and the spool's durability rules."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from dermpacs.imaging.sopclasses import PHOTO_SOP_CLASSES, VL_PHOTOGRAPHIC_IMAGE
from dermpacs.intake import AdmissionRefused, Spool, SpoolError, StoreStatus, admit
from dermpacs.intake.admission import is_valid_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def photo(rows: int = 8, columns: int = 10, *, pixel_bytes: int | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = VL_PHOTOGRAPHIC_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    size = rows * columns * 3 if pixel_bytes is None else pixel_bytes
    ds.PixelData = np.arange(size, dtype=np.uint8).tobytes()
    return ds


def encode(ds: Dataset, syntax=ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def check(encoded: bytes, ds: Dataset, syntax=ExplicitVRLittleEndian, **overrides):
    args = {
        "affected_sop_class_uid": ds.SOPClassUID,
        "affected_sop_instance_uid": ds.SOPInstanceUID,
        "transfer_syntax_uid": syntax,
        "accepted_sop_classes": PHOTO_SOP_CLASSES,
        "max_megapixels": 60.0,
    }
    args.update(overrides)
    return admit(encoded, **args)


def refusal(encoded: bytes, ds: Dataset, syntax=ExplicitVRLittleEndian, **overrides):
    with pytest.raises(AdmissionRefused) as info:
        check(encoded, ds, syntax, **overrides)
    return info.value


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_native_photo_is_admitted_with_its_uids(syntax):
    ds = photo()
    admitted = check(encode(ds, syntax), ds, syntax)
    assert admitted.sop_instance_uid == ds.SOPInstanceUID
    assert admitted.study_instance_uid == ds.StudyInstanceUID
    assert (admitted.rows, admitted.columns) == (8, 10)
    assert admitted.transfer_syntax_uid == syntax


def test_an_encapsulated_jpeg_photo_is_admitted():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 120, 90)).save(buffer, format="JPEG")
    ds = photo(8, 16)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    assert check(encode(ds, JPEGBaseline8Bit), ds, JPEGBaseline8Bit).columns == 16


def test_a_class_that_is_not_a_photograph_gets_0122():
    ds = photo()
    ds.SOPClassUID = CT_IMAGE
    assert refusal(encode(ds), ds).status is StoreStatus.SOP_CLASS_NOT_SUPPORTED


def test_a_header_that_disagrees_with_the_request_gets_a900():
    ds = photo()
    encoded = encode(ds)
    wrong_instance = refusal(encoded, ds, affected_sop_instance_uid=generate_uid())
    assert wrong_instance.status is StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    wrong_class = refusal(
        encoded, ds, affected_sop_class_uid=PHOTO_SOP_CLASSES[1]
    )  # a photo class, but not the one in the data set
    assert wrong_class.status is StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SeriesInstanceUID", "Rows"])
def test_a_missing_required_attribute_gets_a900(missing):
    ds = photo()
    delattr(ds, missing)
    got = refusal(encode(ds), ds)
    assert got.status is StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert missing in got.reason


def test_pixel_data_shorter_than_rows_by_columns_gets_c000():
    ds = photo(8, 10, pixel_bytes=100)
    got = refusal(encode(ds), ds)
    assert got.status is StoreStatus.CANNOT_UNDERSTAND and "Pixel Data" in got.reason


def test_a_truncated_file_gets_c000():
    ds = photo(8, 10)
    encoded = encode(ds)
    assert refusal(encoded[:-50], ds).status is StoreStatus.CANNOT_UNDERSTAND
    assert refusal(encoded[:200], ds).status is StoreStatus.CANNOT_UNDERSTAND


def test_every_cut_of_a_photo_is_refused():
    ds = photo(8, 10)
    encoded = encode(ds)
    statuses = set()
    for cut in range(0, len(encoded) - 1, 3):
        statuses.add(refusal(encoded[:cut], ds).status)
    # cut inside an element: cannot understand; cut between elements: attributes missing
    assert statuses == {
        StoreStatus.CANNOT_UNDERSTAND,
        StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    }


def test_no_pixel_data_gets_a900():
    ds = photo()
    del ds.PixelData
    assert refusal(encode(ds), ds).status is StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS


def test_a_photo_above_the_size_limit_gets_c000_without_reading_pixels():
    ds = photo(8, 10, pixel_bytes=4)  # pixel data would be refused too: size is checked first
    ds.Rows, ds.Columns = 20000, 20000
    got = refusal(encode(ds), ds)
    assert got.status is StoreStatus.CANNOT_UNDERSTAND and "400.0 MP" in got.reason


def test_garbage_gets_c000():
    ds = photo()
    assert refusal(b"\x00" * 300, ds).status is StoreStatus.CANNOT_UNDERSTAND


def test_reasons_never_carry_patient_data():
    ds = photo(8, 10, pixel_bytes=3)
    assert "Doe" not in refusal(encode(ds), ds).reason


def test_uid_syntax():
    assert is_valid_uid("1.2.840.10008.1.2")
    assert is_valid_uid("2.25.0")
    assert not is_valid_uid("1.02.3")
    assert not is_valid_uid("1.2.")
    assert not is_valid_uid("1." + "1" * 70)
    assert not is_valid_uid(None)


def test_the_spool_writes_whole_files_and_refuses_below_the_watermark(tmp_path):
    spool = Spool(tmp_path, min_free_bytes=0)
    path = spool.spool_received_instance(b"DICM-bytes", "1.2.3")
    assert path.read_bytes() == b"DICM-bytes"
    assert path.name.startswith("1.2.3.") and path.parent.parent == tmp_path / "spool"
    assert list((tmp_path / "spool" / ".incoming").iterdir()) == []
    again = spool.spool_received_instance(b"DICM-bytes", "1.2.3")
    assert again != path  # two receptions of one instance never overwrite each other

    full = Spool(tmp_path, min_free_bytes=spool.free_bytes() + 2**30)
    with pytest.raises(SpoolError, match="min_free_mb"):
        full.spool_received_instance(b"x", "1.2.4")
    assert not list((tmp_path / "spool").rglob("1.2.4.*"))


def test_a_failed_spool_write_leaves_nothing(tmp_path, monkeypatch):
    spool = Spool(tmp_path)

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(SpoolError, match="No space left"):
        spool.spool_received_instance(b"abc", "1.2.5")
    monkeypatch.undo()
    assert list((tmp_path / "spool").rglob("*.part")) == []
    assert list((tmp_path / "spool").rglob("*.dcm")) == []


def test_an_incoming_file_is_written_as_it_arrives_and_committed_whole(tmp_path, monkeypatch):
    from dermpacs.intake import spool as spool_module

    started: list[tuple[int, int]] = []
    monkeypatch.setattr(
        spool_module, "start_writeback", lambda fd, offset, length: started.append((offset, length))
    )
    spool = Spool(tmp_path)
    incoming = spool.open_incoming()
    piece = bytes(range(256)) * 1024  # 256 KiB
    for _ in range(6):
        incoming.write(piece)
    # write-back was started for each 512 KiB as it arrived, before the commit
    assert started == [(0, 2**19), (2**19, 2**19), (2**20, 2**19)]
    assert incoming.path.parent.name == ".incoming" and incoming.path.stat().st_size == 6 * 2**18
    path = incoming.commit("1.2.6")
    assert path.read_bytes() == piece * 6 and path.name.startswith("1.2.6.")
    assert list((tmp_path / "spool" / ".incoming").iterdir()) == []
    incoming.discard()  # after the commit: nothing happens
    assert path.exists()


def test_a_failed_incoming_write_is_kept_and_the_rest_ignored(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    incoming = spool.open_incoming()
    incoming.write(b"first part")

    def no_space(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    assert incoming.write(b"second part") == len(b"second part")  # the sender's bytes are read
    monkeypatch.undo()
    assert incoming.write(b"third part") == len(b"third part")
    assert isinstance(incoming.error, SpoolError) and not incoming.path.exists()
    with pytest.raises(SpoolError, match="No space left"):
        incoming.commit("1.2.7")
    assert list((tmp_path / "spool").rglob("*.dcm")) == []


def test_an_incoming_file_that_crosses_the_watermark_is_refused_at_commit(tmp_path, monkeypatch):
    spool = Spool(tmp_path, min_free_bytes=2**20)
    incoming = spool.open_incoming()
    incoming.write(b"photo")
    monkeypatch.setattr(Spool, "free_bytes", lambda self: 2**19)  # the disk filled meanwhile
    with pytest.raises(SpoolError, match="min_free_mb"):
        incoming.commit("1.2.8")
    assert list((tmp_path / "spool").rglob("*.part")) == []
    assert list((tmp_path / "spool").rglob("*.dcm")) == []


def test_stale_partial_files_are_cleared_at_start_up(tmp_path):
    spool = Spool(tmp_path)
    stale = tmp_path / "spool" / ".incoming" / "old.part"
    fresh = tmp_path / "spool" / ".incoming" / "new.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(stale, (1, 1))
    assert spool.clear_incoming() == 1
    assert fresh.exists() and not stale.exists()
