"""Which C-STORE requests the listener takes, decided from the header alone.

The checks are cheap: the request's SOP class, then the data set's header read with
``stop_before_pixels`` and the length of the Pixel Data element; pixel data is never decoded
here (the worker does that). A refusal carries the C-STORE status of PS3.4 Annex B.2.3 and a
reason that names UIDs and attributes only, never patient data.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from dermpacs.intake.priority import header_values

# PS3.5 9.1: a UID is at most 64 characters of digits and dots, components without
# leading zeros (a lone "0" is allowed).
_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000)
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
# Photographs nest sequences a few levels deep (code sequences in an anatomic region, say);
# anything deeper is refused at the door rather than left to recurse in the worker.
MAX_SEQUENCE_DEPTH = 16


class StoreStatus(IntEnum):
    """C-STORE response statuses the listener answers with (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class AdmissionRefused(Exception):
    """The request is refused with ``status``; ``reason`` is for the log and ErrorComment."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(f"0x{status:04X} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class AdmittedInstance:
    """The header facts of an admitted instance that the job store records."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    rows: int
    columns: int
    # Values of the header attributes asked for (``admit(keywords=...)``), for the
    # priority rules.
    header_values: dict[str, tuple[str, ...]] = field(default_factory=dict)


def is_valid_uid(value: object) -> bool:
    """Whether ``value`` is a syntactically valid UID (PS3.5 9.1)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_PATTERN.match(value))


def _check_pixel_data_element(
    stream: BinaryIO, transfer_syntax: UID, expected_native_length: int
) -> None:
    """Look at the Pixel Data element where the header parse stopped, without reading it."""
    start = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(start)
    head = stream.read(16)  # tag, VR, length and the first item tag at most
    remaining = end - start
    if remaining < 8 or head[:4] != _PIXEL_DATA_TAG:
        raise AdmissionRefused(StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "no Pixel Data")
    if transfer_syntax == ImplicitVRLittleEndian:
        (length,) = struct.unpack_from("<I", head, 4)
        value_start = 8
    else:
        vr = head[4:6]
        if vr in _LONG_VRS:
            if remaining < 12:
                raise AdmissionRefused(StoreStatus.CANNOT_UNDERSTAND, "Pixel Data truncated")
            (length,) = struct.unpack_from("<I", head, 8)
            value_start = 12
        else:
            (length,) = struct.unpack_from("<H", head, 6)
            value_start = 8
    available = remaining - value_start
    if transfer_syntax.is_compressed:
        # Encapsulated (PS3.5 A.4): undefined length, then items (offset table first).
        if length != _UNDEFINED_LENGTH or head[value_start : value_start + 4] != _ITEM_TAG:
            raise AdmissionRefused(
                StoreStatus.CANNOT_UNDERSTAND, "Pixel Data is not encapsulated as its syntax says"
            )
        return
    if length == _UNDEFINED_LENGTH or length > available:
        raise AdmissionRefused(
            StoreStatus.CANNOT_UNDERSTAND,
            f"Pixel Data declares {length} bytes, {available} received",
        )
    if length < expected_native_length:
        raise AdmissionRefused(
            StoreStatus.CANNOT_UNDERSTAND,
            f"Pixel Data has {length} bytes, Rows x Columns x samples need "
            f"{expected_native_length}",
        )


def _check_complete(header: Dataset) -> None:
    """Refuse a header that the parser read past the end of the bytes.

    pydicom reads a cut stream without complaint: it stops where the bytes end and keeps a
    short value. Compare each element's declared length with what was read.
    """
    if "TransferSyntaxUID" not in header.file_meta:
        raise AdmissionRefused(
            StoreStatus.CANNOT_UNDERSTAND, "file meta information incomplete (truncated)"
        )
    for tag in header.keys():  # noqa: SIM118 (iterating a Dataset converts raw elements)
        raw = header.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.length != _UNDEFINED_LENGTH:
            value = raw.value or b""
            if len(value) < raw.length:
                raise AdmissionRefused(
                    StoreStatus.CANNOT_UNDERSTAND,
                    f"element {tag} declares {raw.length} bytes, {len(value)} received",
                )


def _is_sequence(raw: object, tag: int) -> bool:
    vr = getattr(raw, "VR", None)
    if vr is None:  # implicit VR: the dictionary says
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return False
    return vr == "SQ"


def _check_nesting(header: Dataset, max_depth: int = MAX_SEQUENCE_DEPTH) -> None:
    """Refuse sequences nested deeper than ``max_depth``.

    pydicom parses a sequence when it is first used; walking level by level (not by
    recursion) parses each level once and stops at the limit, so a hostile nesting cannot
    exhaust the stack here or later in the worker.
    """
    pending: list[tuple[Dataset, int]] = [(header, 0)]
    while pending:
        dataset, depth = pending.pop()
        for tag in dataset.keys():  # noqa: SIM118 (iterating a Dataset converts every element)
            if not _is_sequence(dataset.get_item(tag), int(tag)):
                continue
            items = dataset[tag].value or []
            if items and depth + 1 > max_depth:
                raise AdmissionRefused(
                    StoreStatus.CANNOT_UNDERSTAND,
                    f"sequences nested deeper than {max_depth} levels",
                )
            pending.extend((item, depth + 1) for item in items)


_IMAGE_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames")


def _positive_int(image: dict[str, object], keyword: str) -> int:
    value = image.get(keyword)
    if not isinstance(value, int) or value <= 0:
        raise AdmissionRefused(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} missing or not positive"
        )
    return value


def admit(
    encoded: bytes | BinaryIO,
    *,
    affected_sop_class_uid: str,
    affected_sop_instance_uid: str,
    transfer_syntax_uid: str,
    accepted_sop_classes: Collection[str],
    max_megapixels: float,
    keywords: Sequence[str] = (),
) -> AdmittedInstance:
    """Decide from the header whether a received instance is taken.

    Parameters
    ----------
    encoded
        The data set as received, with file meta information, as bytes or as a binary file
        positioned at its start (the spool file as it arrived).
    affected_sop_class_uid, affected_sop_instance_uid
        From the C-STORE request.
    transfer_syntax_uid
        The presentation context's transfer syntax.
    accepted_sop_classes
        The SOP classes read as photographs.
    max_megapixels
        Largest Rows x Columns taken, in millions of pixels.
    keywords
        Header attributes whose values are handed back (``header_values``).

    Returns
    -------
    AdmittedInstance

    Raises
    ------
    AdmissionRefused
        0x0122 for a SOP class that is not a photograph, 0xA900 when the header does not
        match the request or lacks a required attribute, 0xC000 when the bytes do not parse
        or the photo is larger than ``max_megapixels``.
    """
    if affected_sop_class_uid not in accepted_sop_classes:
        raise AdmissionRefused(
            StoreStatus.SOP_CLASS_NOT_SUPPORTED,
            f"SOP class {affected_sop_class_uid} is not a photograph class",
        )
    syntax = UID(transfer_syntax_uid)
    stream = io.BytesIO(encoded) if isinstance(encoded, bytes | bytearray) else encoded
    try:
        header = dcmread(stream, stop_before_pixels=True)
        _check_complete(header)
        _check_nesting(header)
        sop_class = header.get("SOPClassUID")
        sop_instance = header.get("SOPInstanceUID")
        study = header.get("StudyInstanceUID")
        series = header.get("SeriesInstanceUID")
        # Converted here, where a value of the wrong length (a US of 3 bytes) is caught.
        image = {keyword: header.get(keyword) for keyword in _IMAGE_KEYWORDS}
        wanted = header_values(header, keywords)
    except AdmissionRefused:
        raise
    except Exception as exc:  # a hostile header can raise anything from the parser
        raise AdmissionRefused(
            StoreStatus.CANNOT_UNDERSTAND, f"header does not parse: {type(exc).__name__}"
        ) from exc
    if sop_class != affected_sop_class_uid:
        raise AdmissionRefused(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOP Class UID {sop_class} differs from the request's {affected_sop_class_uid}",
        )
    if sop_instance != affected_sop_instance_uid:
        raise AdmissionRefused(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            "SOP Instance UID differs from the request's",
        )
    for keyword, value in (
        ("SOPInstanceUID", sop_instance),
        ("StudyInstanceUID", study),
        ("SeriesInstanceUID", series),
    ):
        if not is_valid_uid(value):
            raise AdmissionRefused(
                StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} missing or not a UID"
            )
    try:
        rows = _positive_int(image, "Rows")
        columns = _positive_int(image, "Columns")
        samples = _positive_int(image, "SamplesPerPixel")
        bits = _positive_int(image, "BitsAllocated")
        frames = int(image["NumberOfFrames"] or 1)
    except (TypeError, ValueError) as exc:
        raise AdmissionRefused(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"image pixel module: {exc}"
        ) from exc
    megapixels = rows * columns / 1e6
    if megapixels > max_megapixels:
        raise AdmissionRefused(
            StoreStatus.CANNOT_UNDERSTAND,
            f"{rows} x {columns} is {megapixels:.1f} MP, above intake.max_megapixels",
        )
    if syntax != DeflatedExplicitVRLittleEndian:  # deflated: the parser read an inflated copy
        expected = rows * columns * samples * ((bits + 7) // 8) * max(frames, 1)
        _check_pixel_data_element(stream, syntax, expected)
    return AdmittedInstance(
        study_instance_uid=str(study),
        series_instance_uid=str(series),
        sop_instance_uid=str(sop_instance),
        sop_class_uid=str(sop_class),
        transfer_syntax_uid=str(syntax),
        rows=rows,
        columns=columns,
        header_values=wanted,
    )
