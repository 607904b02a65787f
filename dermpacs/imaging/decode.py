"""Turn a received photograph into an RGB array, or refuse it with one clear error.

Every photograph dermpacs analyses goes through :func:`read_photograph` (a parsed data set)
or :func:`read_photograph_bytes` (a file or its bytes). Both return a :class:`Photograph`:
an ``H x W x 3`` ``uint8`` RGB array plus the identifiers the DICOM writers need. Anything
that cannot be read as one photograph raises :class:`PhotographError`, whose ``reason`` tells
the listener which C-STORE status to answer and whose message tells a PACS administrator
what is wrong.

The header is checked before any pixel is decoded (:func:`check_photograph`): the SOP class,
the number of frames, Rows and Columns and the size limit, the pixel format, the length of
native pixel data and the dimensions written inside a compressed codestream. A hostile or
broken header therefore costs a few attribute reads, never a 60-gigapixel allocation.

Decoding uses pydicom's pixel decoders and the codec packages made for them (pylibjpeg with
pylibjpeg-libjpeg and pylibjpeg-openjpeg, pyjpegls, pillow; not python-gdcm, see sopclasses).
Colour conversion happens exactly once: pydicom's decoders hand back the codestream's own
samples (YCbCr for a JFIF JPEG) and convert YBR_FULL and YBR_FULL_422 to RGB themselves, while
the JPEG 2000 decoders undo YBR_ICT and YBR_RCT; the returned pixel description says which
colour space the array is in, and this module converts only what is still not RGB.

An 8-bit colour JPEG (Baseline or Extended, what cameras send) is decoded by pillow's
libjpeg-turbo first, which converts YCbCr to RGB as it decodes, as the codestream's markers say:
a 12-megapixel camera photo takes about 0.15 s there against about 0.6 s through
pylibjpeg-libjpeg and a numpy colour conversion (docs/benchmarks.md). A frame pillow does not
read goes to pydicom's decoders as every other photo does, so the refusals stay the same.

With ``preview_long_side``, :func:`read_photograph` also returns a preview of such a JPEG
(:attr:`Photograph.preview`) at 1/2, 1/4 or 1/8 of its size, decoded by libjpeg's DCT scaling
(pillow's ``draft``): only the low-frequency coefficients of each block are inverse
transformed, which is cheaper and aliases less than resampling the full pixels. The worker
makes its segmentation input from it. Other encodings get no preview; the header checks and
the refusals are those of the full read.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from io import BytesIO
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import apply_color_lut, convert_color_space
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from dermpacs.imaging.sopclasses import (
    ACCEPTED_TRANSFER_SYNTAXES,
    HTJ2K_TRANSFER_SYNTAXES,
    LOSSY_TRANSFER_SYNTAXES,
    MULTIFRAME_TRUE_COLOR_SC_IMAGE,
    PHOTO_SOP_CLASSES,
    decoding_plugins,
)

DEFAULT_MAX_MEGAPIXELS: Final = 60.0

_PIXEL_DATA_TAG: Final = 0x7FE00010
_FLOAT_PIXEL_DATA_KEYWORDS: Final = ("FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF

_COLOUR_PHOTOMETRICS: Final = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_GREY_PHOTOMETRICS: Final = frozenset({"MONOCHROME1", "MONOCHROME2"})
_PALETTE: Final = "PALETTE COLOR"
SUPPORTED_PHOTOMETRICS: Final = _COLOUR_PHOTOMETRICS | _GREY_PHOTOMETRICS | {_PALETTE}
"""Photometric Interpretations read as photographs (PS3.3 C.7.6.3.1.2)."""

REDUCTIONS: Final = (8, 4, 2, 1)
"""Size reductions :func:`choose_reduction` chooses from (1: none): the scales at which libjpeg's
DCT scaling decodes a JPEG without resampling (ISO 10918-1 blocks of 8 x 8 samples)."""
# Transfer syntaxes whose 8-bit DCT codestreams libjpeg decodes at reduced scale (lossless JPEG
# has no DCT; a 12-bit extended codestream is not read by pillow's 8-bit libjpeg).
_DCT_SCALABLE_SYNTAXES: Final = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})

# Which codestream family a compressed transfer syntax carries, for the header check.
_JPEG_FAMILY: Final = frozenset(JPEGTransferSyntaxes) | frozenset(JPEGLSTransferSyntaxes)
_J2K_FAMILY: Final = frozenset(JPEG2000TransferSyntaxes) | HTJ2K_TRANSFER_SYNTAXES


class RefusalReason(StrEnum):
    """Why a received object cannot be read as a photograph.

    The listener maps each reason to a C-STORE status (PS3.4 B.2.3): for example
    ``NOT_A_PHOTOGRAPH`` to 0x0122 (SOP class not supported), ``TOO_LARGE`` to 0xA700
    (out of resources) and the others to 0xA900 or 0xC000 (cannot understand).
    """

    UNPARSEABLE = "unparseable"
    """The bytes are not a readable DICOM object (garbage, a truncated file, broken encoding)."""
    NOT_A_PHOTOGRAPH = "not_a_photograph"
    """The SOP class is not one of the photograph classes (a CT slice, an SR, ...)."""
    MISSING_IDENTIFIERS = "missing_identifiers"
    """SOP Instance, Study Instance or Series Instance UID is absent or empty."""
    NO_PIXEL_DATA = "no_pixel_data"
    """A photograph class without (7FE0,0010) Pixel Data."""
    MISSING_DIMENSIONS = "missing_dimensions"
    """Rows or Columns is absent, empty or zero."""
    INVALID_HEADER = "invalid_header"
    """An Image Pixel attribute has an impossible value or contradicts another one."""
    MULTI_FRAME = "multi_frame"
    """More than one frame: dermpacs analyses single photographs."""
    TOO_LARGE = "too_large"
    """Rows x Columns is above the configured limit."""
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    """The pixel encoding is not one dermpacs accepts, or no decoder for it is installed."""
    UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric"
    """A Photometric Interpretation that is not RGB, YBR, palette or greyscale."""
    UNSUPPORTED_PIXEL_FORMAT = "unsupported_pixel_format"
    """A sample layout no photograph uses (1 or 32 bits allocated, float pixel data)."""
    TRUNCATED_PIXEL_DATA = "truncated_pixel_data"
    """Fewer pixel data bytes than Rows, Columns and the sample layout require."""
    CORRUPT_PIXEL_DATA = "corrupt_pixel_data"
    """Compressed pixel data that does not decode or does not match the header."""


class PhotographError(ValueError):
    """A received object that cannot be read as a photograph.

    Parameters
    ----------
    reason : RefusalReason
        The kind of problem, for choosing a C-STORE status.
    message : str
        What is wrong, in words a PACS administrator understands.
    """

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the reason when the error crosses a process boundary (a worker's result).
        return (type(self), (self.reason, str(self)))


@dataclass(frozen=True)
class PhotographHeader:
    """The checked facts of a photograph's header, before its pixels are decoded.

    Returned by :func:`check_photograph`; every value has passed the checks described there.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    photometric_interpretation: str
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    planar_configuration: int
    lossy_compression: bool

    @property
    def megapixels(self) -> float:
        """Rows x Columns in millions of pixels."""
        return self.rows * self.columns / 1e6


@dataclass(frozen=True, eq=False)
class Photograph:
    """One decoded photograph: RGB pixels and the facts the DICOM writers need.

    Attributes
    ----------
    rgb : numpy.ndarray
        ``rows x columns x 3`` ``uint8``, C-contiguous, read-only (copy it to change it).
        Greyscale photos have three equal channels; MONOCHROME1 is inverted so that higher
        values are brighter; samples beyond 8 bits are scaled to 8.
    sop_class_uid, sop_instance_uid, study_instance_uid, series_instance_uid : str
        The source's identifiers; results go into ``study_instance_uid``.
    transfer_syntax_uid : str
        The transfer syntax the photo arrived in.
    photometric_interpretation : str
        (0028,0004) as received (e.g. ``YBR_FULL_422`` for a camera JPEG), not as decoded.
    rows, columns : int
        The source's dimensions; ``rgb.shape[:2] == (rows, columns)``.
    lossy_compression : bool
        Whether the source is, or may be, lossy compressed (its (0028,2110) Lossy Image
        Compression is ``01`` or its transfer syntax is lossy); derived images must then say
        so too (PS3.3 C.7.6.1.1.5).
    preview : numpy.ndarray or None
        The same photo decoded by the codec at 1/2, 1/4 or 1/8 scale (DCT scaling),
        ``ceil(rows / k) x ceil(columns / k) x 3`` ``uint8``, read-only, when it was asked for
        (``preview_long_side`` of :func:`read_photograph`) and the codec can scale; else None.
    """

    rgb: np.ndarray = field(repr=False)
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    photometric_interpretation: str
    rows: int
    columns: int
    lossy_compression: bool = False
    preview: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        rgb = self.rgb
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
            raise TypeError('Argument "rgb" must be a numpy.ndarray of dtype uint8.')
        if rgb.shape != (self.rows, self.columns, 3):
            raise ValueError(
                f'Argument "rgb" must have shape (rows, columns, 3) = '
                f"({self.rows}, {self.columns}, 3), not {rgb.shape}."
            )
        # A read-only view: the caller's array keeps its own flags, and nobody downstream
        # can change the pixels that SEG, SR and overlay are all derived from.
        view = np.ascontiguousarray(rgb).view()
        view.flags.writeable = False
        object.__setattr__(self, "rgb", view)
        if self.preview is not None:
            preview = self.preview
            shapes = {(*reduced_shape(self.rows, self.columns, k), 3) for k in REDUCTIONS[:-1]}
            if preview.dtype != np.uint8 or preview.shape not in shapes:
                raise ValueError(
                    'Argument "preview" must be uint8 of shape (ceil(rows / k), '
                    f"ceil(columns / k), 3) for k in 2, 4, 8, not {preview.dtype} {preview.shape}."
                )
            view = np.ascontiguousarray(preview).view()
            view.flags.writeable = False
            object.__setattr__(self, "preview", view)


def reduced_shape(rows: int, columns: int, reduction: int) -> tuple[int, int]:
    """Rows and columns of a ``rows x columns`` photo reduced by ``reduction``.

    Rounded up, as libjpeg's scaled output and pillow's ``Image.reduce`` are: a partial last
    block still gives a pixel.
    """
    return -(-rows // reduction), -(-columns // reduction)


def choose_reduction(rows: int, columns: int, target_long_side: int) -> int:
    """The largest of :data:`REDUCTIONS` that keeps the long side at least ``target_long_side``.

    Parameters
    ----------
    rows, columns : int
        The photograph's size.
    target_long_side : int
        The smallest long side, in pixels, the reduced photo may have.

    Returns
    -------
    int
        8, 4, 2 or 1 (no reduction, also when the photo is already smaller than the target).
    """
    if target_long_side < 1:
        raise ValueError('Argument "target_long_side" must be a positive number of pixels.')
    for reduction in REDUCTIONS:
        if max(reduced_shape(rows, columns, reduction)) >= target_long_side:
            return reduction
    return 1


# --- reading ------------------------------------------------------------------------------


def read_photograph_bytes(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
) -> Photograph:
    """Parse a DICOM file (its bytes or its path) and read it as a photograph.

    Parameters
    ----------
    data : bytes | bytearray | memoryview | str | os.PathLike
        A DICOM file in PS3.10 format (128-byte preamble, ``DICM``, file meta information),
        or the path to one. Deflated files are inflated by pydicom.
    max_megapixels : float
        The largest Rows x Columns accepted, in millions of pixels.

    Returns
    -------
    Photograph
        The decoded photograph.

    Raises
    ------
    PhotographError
        ``UNPARSEABLE`` when the bytes do not parse as a complete DICOM file, or any reason
        of :func:`read_photograph`.
    OSError
        When a path is given and the file cannot be opened: a local problem, not the
        sender's.
    """
    dataset = parse_dicom_file(data)
    return read_photograph(dataset, max_megapixels=max_megapixels)


def parse_dicom_file(data: bytes | bytearray | memoryview | str | os.PathLike[str]) -> Dataset:
    """Parse a DICOM file completely, so that later attribute reads cannot fail.

    pydicom reads values lazily and stops quietly at the end of a short file; this reads
    every element once and compares each element's length with the bytes present.

    Parameters
    ----------
    data : bytes | bytearray | memoryview | str | os.PathLike
        The file's bytes, or its path.

    Returns
    -------
    pydicom.dataset.Dataset
        The data set, with its ``file_meta``.

    Raises
    ------
    PhotographError
        ``UNPARSEABLE`` for anything that is not a complete DICOM file;
        ``TRUNCATED_PIXEL_DATA`` when the file ends inside the pixel data.
    OSError
        When a path is given and the file cannot be opened.
    """
    raw = Path(data).read_bytes() if isinstance(data, str | os.PathLike) else bytes(data)
    try:
        dataset = pydicom.dcmread(BytesIO(raw), force=False)
    except InvalidDicomError as exc:
        raise PhotographError(
            RefusalReason.UNPARSEABLE,
            "The data is not a DICOM file: it does not start with the 128-byte preamble and "
            "'DICM' followed by file meta information (PS3.10 7.1).",
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises many types for broken input
        raise PhotographError(
            RefusalReason.UNPARSEABLE,
            f"The data is not a readable DICOM file ({_describe(exc)}).",
        ) from exc
    _check_complete(dataset)
    _check_fully_read(dataset, len(raw))
    if len(dataset) == 0:
        raise PhotographError(
            RefusalReason.UNPARSEABLE,
            "The DICOM file holds file meta information but no data set: it is empty or "
            "was cut short.",
        )
    _read_every_element(dataset)
    return dataset


def read_photograph(
    dataset: Dataset,
    *,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    preview_long_side: int | None = None,
) -> Photograph:
    """Read a parsed data set as a photograph: check its header, then decode its pixels.

    With ``preview_long_side``, an 8-bit colour JPEG (Baseline or Extended) is also decoded at
    the smallest of 1/2, 1/4 and 1/8 scale whose long side is at least ``preview_long_side``
    by libjpeg's DCT scaling (ISO 10918-1 A.3.3 inverse transform of the low-frequency
    coefficients only): the analysis input is made from that small picture, which the codec
    gives more cheaply and with less aliasing than resampling 12 megapixels, while crops and
    the overlay use the full pixels. Other encodings, and photos too small to reduce, get no
    preview. The header checks, the size limit (on the full size) and the refusals are the
    same with or without a preview.

    Parameters
    ----------
    dataset : pydicom.dataset.Dataset
        The received object. Its ``file_meta.TransferSyntaxUID`` names the encoding; without
        it (a data set decoded off the network) the encoding pydicom read it with is used,
        which only works for native pixel data.
    max_megapixels : float
        The largest Rows x Columns accepted, in millions of pixels.
    preview_long_side : int, optional
        Ask for a preview (:attr:`Photograph.preview`) of at least this long side.

    Returns
    -------
    Photograph
        The RGB pixels and the source's identifiers.

    Raises
    ------
    PhotographError
        For every object that is not one readable photograph; ``reason`` says why.
    ValueError
        ``preview_long_side`` is not a positive integer.
    """
    if preview_long_side is not None and (
        isinstance(preview_long_side, bool)
        or not isinstance(preview_long_side, int)
        or preview_long_side < 1
    ):
        raise ValueError('Argument "preview_long_side" must be a positive number of pixels.')
    header = check_photograph(dataset, max_megapixels=max_megapixels)
    rgb: np.ndarray | None = None
    preview: np.ndarray | None = None
    if _pillow_jpeg(header):
        frame = _first_frame(_pixel_data_bytes(dataset), header)
        rgb = _decode_jpeg_pillow(frame, header, 1)
        if rgb is not None and preview_long_side is not None:
            reduction = choose_reduction(header.rows, header.columns, preview_long_side)
            if reduction > 1:
                preview = _decode_jpeg_pillow(frame, header, reduction)
    if rgb is None:
        rgb = _decode_rgb(dataset, header)
    return Photograph(
        rgb=rgb,
        sop_class_uid=header.sop_class_uid,
        sop_instance_uid=header.sop_instance_uid,
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
        transfer_syntax_uid=header.transfer_syntax_uid,
        photometric_interpretation=header.photometric_interpretation,
        rows=header.rows,
        columns=header.columns,
        lossy_compression=header.lossy_compression,
        preview=preview,
    )


def check_photograph(
    dataset: Dataset, *, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
) -> PhotographHeader:
    """Check a photograph's header without decoding its pixels.

    Cheap enough for the listener to call while the association is open. The checks, in
    order: complete elements, SOP class, identifiers, pixel data present, transfer syntax,
    Number of Frames, Rows and Columns, size limit, pixel format, native pixel data length,
    and for compressed data the dimensions inside the codestream.

    Parameters
    ----------
    dataset : pydicom.dataset.Dataset
        The received object.
    max_megapixels : float
        The largest Rows x Columns accepted, in millions of pixels.

    Returns
    -------
    PhotographHeader
        The checked header facts.

    Raises
    ------
    PhotographError
        With the reason of the first check that fails.
    """
    if max_megapixels <= 0:
        raise ValueError('Argument "max_megapixels" must be positive.')
    _check_complete(dataset)

    sop_class_uid = _uid(dataset, "SOPClassUID")
    if sop_class_uid is None:
        raise PhotographError(
            RefusalReason.NOT_A_PHOTOGRAPH,
            "The object has no SOP Class UID (0008,0016), so it cannot be a photograph.",
        )
    if sop_class_uid not in PHOTO_SOP_CLASSES:
        raise PhotographError(
            RefusalReason.NOT_A_PHOTOGRAPH,
            f"The object is a {_uid_name(sop_class_uid)} ({sop_class_uid}), not a photograph; "
            f"dermpacs reads {_accepted_classes_text()}.",
        )

    identifiers: dict[str, str] = {}
    for keyword, tag in (
        ("SOPInstanceUID", "(0008,0018)"),
        ("StudyInstanceUID", "(0020,000D)"),
        ("SeriesInstanceUID", "(0020,000E)"),
    ):
        value = _uid(dataset, keyword)
        if value is None:
            raise PhotographError(
                RefusalReason.MISSING_IDENTIFIERS,
                f"The photograph has no {_spaced(keyword)} {tag}; results could not be "
                "placed in its study.",
            )
        identifiers[keyword] = value

    for keyword in _FLOAT_PIXEL_DATA_KEYWORDS:
        if keyword in dataset:
            raise PhotographError(
                RefusalReason.UNSUPPORTED_PIXEL_FORMAT,
                f"The photograph holds {_spaced(keyword)} (floating point samples); "
                "photographs have integer samples in Pixel Data (7FE0,0010).",
            )
    if _PIXEL_DATA_TAG not in dataset:
        raise PhotographError(
            RefusalReason.NO_PIXEL_DATA,
            "The photograph has no Pixel Data (7FE0,0010).",
        )

    transfer_syntax = _transfer_syntax(dataset)
    number_of_frames = _number_of_frames(dataset)
    if number_of_frames > 1:
        raise PhotographError(
            RefusalReason.MULTI_FRAME,
            f"The object has {number_of_frames} frames; dermpacs analyses single photographs "
            "(send each photo as its own instance).",
        )

    rows = _int(dataset, "Rows")
    columns = _int(dataset, "Columns")
    if rows is None or columns is None or rows <= 0 or columns <= 0:
        missing = [
            name for name, value in (("Rows", rows), ("Columns", columns)) if not value or value < 0
        ]
        raise PhotographError(
            RefusalReason.MISSING_DIMENSIONS,
            f"The photograph's {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing, empty, zero or negative.",
        )
    megapixels = rows * columns / 1e6
    if megapixels > max_megapixels:
        raise PhotographError(
            RefusalReason.TOO_LARGE,
            f"The photograph is {columns} x {rows} pixels ({megapixels:.1f} megapixels), "
            f"above the limit of {max_megapixels:g} megapixels.",
        )

    photometric = _photometric_interpretation(dataset)
    samples_per_pixel, bits_allocated, bits_stored, pixel_representation, planar = _sample_layout(
        dataset, photometric
    )
    if photometric == _PALETTE:
        _check_palette(dataset)

    header = PhotographHeader(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=identifiers["SOPInstanceUID"],
        study_instance_uid=identifiers["StudyInstanceUID"],
        series_instance_uid=identifiers["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax,
        photometric_interpretation=photometric,
        rows=rows,
        columns=columns,
        samples_per_pixel=samples_per_pixel,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=pixel_representation,
        planar_configuration=planar,
        lossy_compression=_is_lossy(dataset, transfer_syntax),
    )
    pixel_data = _pixel_data_bytes(dataset)
    if UID(transfer_syntax).is_encapsulated:
        _check_codestream(_first_frame(pixel_data, header), header)
    else:
        _check_native_length(pixel_data, header)
    return header


# --- header checks ------------------------------------------------------------------------


def _check_complete(dataset: Dataset) -> None:
    """Refuse a data set whose elements are shorter than their declared lengths.

    pydicom stops quietly when a file ends inside an element; the element then holds fewer
    bytes than its header declares. Pixel data cut short gets its own reason.
    """
    datasets: list[Dataset] = [dataset]
    file_meta = getattr(dataset, "file_meta", None)
    if isinstance(file_meta, Dataset):
        datasets.append(file_meta)
    for current in datasets:
        for tag in list(current.keys()):
            try:
                element = current.get_item(tag)
            except Exception as exc:
                raise _unparseable(tag, exc) from exc
            if not isinstance(element, RawDataElement) or element.value is None:
                continue
            if element.length == _UNDEFINED_LENGTH or len(element.value) >= element.length:
                continue
            if tag == _PIXEL_DATA_TAG:
                raise PhotographError(
                    RefusalReason.TRUNCATED_PIXEL_DATA,
                    f"The file ends inside the pixel data: {len(element.value)} of "
                    f"{element.length} bytes are present.",
                )
            raise PhotographError(
                RefusalReason.UNPARSEABLE,
                f"The file ends inside element {_tag_text(tag)}: it was cut short.",
            )


def _check_fully_read(dataset: Dataset, size: int) -> None:
    """Refuse a file that ends inside an element header, where pydicom stops without a word."""
    file_meta = getattr(dataset, "file_meta", None)
    syntax = _uid(file_meta, "TransferSyntaxUID") if isinstance(file_meta, Dataset) else None
    if syntax == DeflatedExplicitVRLittleEndian:
        return  # positions are in the inflated stream; zlib reports a cut-off stream itself
    end = 0
    for tag in list(dataset.keys()):
        element = dataset.get_item(tag)
        if not isinstance(element, RawDataElement) or element.value_tell is None:
            continue
        length = len(element.value) if element.value is not None else 0
        if element.length == _UNDEFINED_LENGTH:
            length += 8  # the Sequence Delimitation Item (PS3.5 7.5)
        end = max(end, element.value_tell + length)
    if 0 < end < size:
        raise PhotographError(
            RefusalReason.UNPARSEABLE,
            f"The file ends inside an element header after byte {end} of {size}: it was cut "
            "short or has trailing bytes that are not DICOM.",
        )


def _read_every_element(dataset: Dataset) -> None:
    """Convert every element once, so that a broken value shows now and as UNPARSEABLE."""
    for current in (getattr(dataset, "file_meta", None), dataset):
        if not isinstance(current, Dataset):
            continue
        for tag in list(current.keys()):
            try:
                element = current[tag]
                if element.VR == "SQ":
                    for item in element.value:
                        _read_every_element(item)
            except PhotographError:
                raise
            except MemoryError:
                raise
            except Exception as exc:
                raise _unparseable(tag, exc) from exc


def _value(dataset: Dataset, keyword: str) -> Any:
    """The value of a top-level attribute, ``None`` when absent or empty."""
    if keyword not in dataset:
        return None
    try:
        element = dataset[keyword]  # the element, not its value: empty values are checked
    except MemoryError:
        raise
    except Exception as exc:
        raise PhotographError(
            RefusalReason.UNPARSEABLE,
            f"The value of {_spaced(keyword)} cannot be read ({_describe(exc)}).",
        ) from exc
    if element.is_empty:
        return None
    return element.value


def _uid(dataset: Dataset, keyword: str) -> str | None:
    value = _value(dataset, keyword)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    text = str(value).strip("\x00 ")
    return text or None


def _int(dataset: Dataset, keyword: str) -> int | None:
    """An integer attribute (US or IS): ``None`` when absent or empty."""
    value = _value(dataset, keyword)
    if value is None:
        return None
    if isinstance(value, bytes) and len(value) == 2:
        # Explicit VR "UN" for a US element: read it as the little endian short it is.
        value = struct.unpack("<H", value)[0]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PhotographError(
            RefusalReason.INVALID_HEADER,
            f"{_spaced(keyword)} has the value {_short_repr(value)}, not a single integer.",
        )
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number.is_integer():
        raise PhotographError(
            RefusalReason.INVALID_HEADER,
            f"{_spaced(keyword)} has the value {_short_repr(value)}, not an integer.",
        )
    return int(number)


def _transfer_syntax(dataset: Dataset) -> str:
    file_meta = getattr(dataset, "file_meta", None)
    syntax = _uid(file_meta, "TransferSyntaxUID") if isinstance(file_meta, Dataset) else None
    if syntax is None:
        # A data set decoded off the network carries its encoding, not a file meta group.
        is_implicit, is_little = dataset.original_encoding
        if is_little is True and is_implicit is not None:
            syntax = ImplicitVRLittleEndian if is_implicit else ExplicitVRLittleEndian
        else:
            raise PhotographError(
                RefusalReason.UNSUPPORTED_TRANSFER_SYNTAX,
                "The object does not say its transfer syntax (no file meta information).",
            )
    if syntax not in ACCEPTED_TRANSFER_SYNTAXES:
        raise PhotographError(
            RefusalReason.UNSUPPORTED_TRANSFER_SYNTAX,
            f"The pixel data is encoded as {_uid_name(syntax)} ({syntax}), which dermpacs "
            "does not read; send it as JPEG, JPEG-LS, JPEG 2000, RLE or uncompressed "
            "little endian.",
        )
    return str(syntax)


def _number_of_frames(dataset: Dataset) -> int:
    frames = _int(dataset, "NumberOfFrames")
    if frames is None:
        return 1
    if frames < 1:
        raise PhotographError(
            RefusalReason.INVALID_HEADER,
            f"Number of Frames (0028,0008) is {frames}; a photograph has one frame.",
        )
    return frames


def _photometric_interpretation(dataset: Dataset) -> str:
    value = _value(dataset, "PhotometricInterpretation")
    if value is None:
        raise PhotographError(
            RefusalReason.INVALID_HEADER,
            "The photograph has no Photometric Interpretation (0028,0004).",
        )
    text = str(value).strip("\x00 ").upper()
    if text not in SUPPORTED_PHOTOMETRICS:
        raise PhotographError(
            RefusalReason.UNSUPPORTED_PHOTOMETRIC,
            f"The photometric interpretation {_short_repr(text)} is not read by dermpacs; "
            f"it reads {', '.join(sorted(SUPPORTED_PHOTOMETRICS))}.",
        )
    return text


def _sample_layout(dataset: Dataset, photometric: str) -> tuple[int, int, int, int, int]:
    """Check and return samples per pixel, bits allocated and stored, sign and planarity."""
    samples_per_pixel = _int(dataset, "SamplesPerPixel")
    expected_samples = 3 if photometric in _COLOUR_PHOTOMETRICS else 1
    if samples_per_pixel is None:
        samples_per_pixel = expected_samples  # a camera that left it out; the PI decides
    if samples_per_pixel != expected_samples:
        raise PhotographError(
            RefusalReason.INVALID_HEADER,
            f"Samples per Pixel is {samples_per_pixel}, but {photometric} needs "
            f"{expected_samples}.",
        )

    bits_allocated = _int(dataset, "BitsAllocated")
    if bits_allocated is None:
        raise PhotographError(
            RefusalReason.INVALID_HEADER, "The photograph has no Bits Allocated (0028,0100)."
        )
    if bits_allocated not in (8, 16):
        raise PhotographError(
            RefusalReason.UNSUPPORTED_PIXEL_FORMAT,
            f"Bits Allocated is {bits_allocated}; photographs have 8 or 16 bits per sample.",
        )
    bits_stored = _int(dataset, "BitsStored")
    if bits_stored is None:
        bits_stored = bits_allocated
    if not 1 <= bits_stored <= bits_allocated:
        raise PhotographError(
            RefusalReason.INVALID_HEADER,
            f"Bits Stored is {bits_stored} with Bits Allocated {bits_allocated}.",
        )
    pixel_representation = _int(dataset, "PixelRepresentation") or 0
    if pixel_representation not in (0, 1):
        raise PhotographError(
            RefusalReason.INVALID_HEADER,
            f"Pixel Representation is {pixel_representation}; it must be 0 or 1.",
        )
    if photometric == _PALETTE and pixel_representation == 1:
        raise PhotographError(
            RefusalReason.INVALID_HEADER,
            "A PALETTE COLOR photograph must have unsigned indices (Pixel Representation 0).",
        )
    planar = _int(dataset, "PlanarConfiguration") or 0
    if samples_per_pixel == 3 and planar not in (0, 1):
        raise PhotographError(
            RefusalReason.INVALID_HEADER,
            f"Planar Configuration is {planar}; it must be 0 or 1.",
        )
    if samples_per_pixel == 1:
        planar = 0
    return samples_per_pixel, bits_allocated, bits_stored, pixel_representation, planar


def _check_palette(dataset: Dataset) -> None:
    for colour in ("Red", "Green", "Blue"):
        descriptor = _value(dataset, f"{colour}PaletteColorLookupTableDescriptor")
        data = _value(dataset, f"{colour}PaletteColorLookupTableData")
        segmented = _value(dataset, f"Segmented{colour}PaletteColorLookupTableData")
        if descriptor is None or (data is None and segmented is None):
            raise PhotographError(
                RefusalReason.INVALID_HEADER,
                f"The PALETTE COLOR photograph has no complete {colour.lower()} palette "
                "(descriptor and data, PS3.3 C.7.6.3.1.5).",
            )
        if not isinstance(descriptor, list | tuple) or len(descriptor) != 3:
            raise PhotographError(
                RefusalReason.INVALID_HEADER,
                f"The {colour.lower()} palette descriptor must have three values.",
            )
        if descriptor[2] not in (8, 16):
            raise PhotographError(
                RefusalReason.INVALID_HEADER,
                f"The {colour.lower()} palette has {descriptor[2]} bits per entry; "
                "it must be 8 or 16.",
            )


def _is_lossy(dataset: Dataset, transfer_syntax: str) -> bool:
    flag = _value(dataset, "LossyImageCompression")
    if flag is not None and str(flag).strip() == "01":
        return True
    return UID(transfer_syntax) in LOSSY_TRANSFER_SYNTAXES


def _pixel_data_bytes(dataset: Dataset) -> bytes:
    value = _value(dataset, "PixelData")
    if value is None:
        raise PhotographError(RefusalReason.NO_PIXEL_DATA, "The Pixel Data (7FE0,0010) is empty.")
    if not isinstance(value, bytes | bytearray):
        raise PhotographError(
            RefusalReason.UNPARSEABLE,
            f"The Pixel Data (7FE0,0010) was read as {type(value).__name__}, not as bytes.",
        )
    return bytes(value)


def _native_frame_length(header: PhotographHeader) -> int:
    bytes_per_sample = header.bits_allocated // 8
    pixels = header.rows * header.columns
    if header.photometric_interpretation == "YBR_FULL_422":
        # Two luminance and two chrominance samples per pair of pixels (PS3.3 C.7.6.3.1.2).
        return pixels * 2 * bytes_per_sample
    return pixels * header.samples_per_pixel * bytes_per_sample


def _check_native_length(pixel_data: bytes, header: PhotographHeader) -> None:
    expected = _native_frame_length(header)
    if len(pixel_data) < expected:
        raise PhotographError(
            RefusalReason.TRUNCATED_PIXEL_DATA,
            f"The pixel data has {len(pixel_data)} bytes, fewer than the {expected} that "
            f"{header.columns} x {header.rows} pixels of {header.photometric_interpretation}, "
            f"{header.bits_allocated} bits, need.",
        )
    if header.photometric_interpretation in ("YBR_ICT", "YBR_RCT"):
        raise PhotographError(
            RefusalReason.INVALID_HEADER,
            f"{header.photometric_interpretation} is only used with JPEG 2000 compression, "
            "not with uncompressed pixel data.",
        )


def _first_frame(pixel_data: bytes, header: PhotographHeader) -> bytes:
    """The encoded frame of an encapsulated single-frame photo (PS3.5 A.4), not decoded."""
    try:
        frame = next(iter(_frames(pixel_data)))
    except StopIteration:
        frame = b""
    except MemoryError:
        raise
    except Exception as exc:
        raise PhotographError(
            RefusalReason.CORRUPT_PIXEL_DATA,
            f"The compressed pixel data is not correctly encapsulated ({_describe(exc)}).",
        ) from exc
    if not frame:
        raise PhotographError(
            RefusalReason.CORRUPT_PIXEL_DATA,
            f"The {_uid_name(header.transfer_syntax_uid)} pixel data holds no encoded frame.",
        )
    return frame


def _frames(pixel_data: bytes) -> Iterator[bytes]:
    # One frame: every fragment belongs to it, whatever the offset table says.
    return generate_frames(pixel_data, number_of_frames=1)


def _check_codestream(frame: bytes, header: PhotographHeader) -> None:
    """Compare a codestream's own header with the data set's, and require its end marker.

    Decoders size their output from the codestream, so a 100 x 100 header over a
    60000 x 60000 JPEG would otherwise allocate gigabytes before anything notices. JPEG
    decoders also return a picture, part grey, from a codestream that was cut short; the
    end-of-image marker after the first scan tells a complete one (ISO 10918-1 B.2.1,
    ISO 14495-1, ISO 15444-1 A.4.4).
    """
    syntax = UID(header.transfer_syntax_uid)
    if syntax in _JPEG_FAMILY:
        found = _jpeg_layout(frame)
        kind = "JPEG-LS" if syntax in JPEGLSTransferSyntaxes else "JPEG"
    elif syntax in _J2K_FAMILY:
        found = _j2k_layout(frame)
        kind = "JPEG 2000"
    elif syntax == RLELossless:
        _check_rle_header(frame, header)
        return
    else:  # pragma: no cover - every accepted encapsulated syntax is handled above
        return
    if found is None:
        raise PhotographError(
            RefusalReason.CORRUPT_PIXEL_DATA,
            f"The pixel data does not start with a readable {kind} codestream header.",
        )
    # A JPEG height of 0 is defined later by a DNL marker (ISO 10918-1 B.2.5): not checkable.
    if (
        (found.rows != header.rows and found.rows != 0)
        or found.columns != header.columns
        or found.components != header.samples_per_pixel
    ):
        raise PhotographError(
            RefusalReason.CORRUPT_PIXEL_DATA,
            f"The {kind} codestream holds {found.columns} x {found.rows} pixels with "
            f"{found.components} components, but the header says {header.columns} x "
            f"{header.rows} with {header.samples_per_pixel}.",
        )
    if found.data_start is None:
        raise PhotographError(
            RefusalReason.TRUNCATED_PIXEL_DATA,
            f"The {kind} codestream ends before its image data: the pixel data was cut short.",
        )
    # Entropy-coded data never holds FF D9 (byte and bit stuffing), so finding it after
    # the first scan means the codestream reaches its end marker.
    if frame.find(b"\xff\xd9", found.data_start) < 0:
        raise PhotographError(
            RefusalReason.TRUNCATED_PIXEL_DATA,
            f"The {kind} codestream has no end-of-image marker: the pixel data was cut short.",
        )


@dataclass(frozen=True)
class _CodestreamLayout:
    rows: int
    columns: int
    components: int
    data_start: int | None  # where the first scan (JPEG) or tile-part data (J2K) begins


def _jpeg_layout(frame: bytes) -> _CodestreamLayout | None:
    """Frame header (SOF, ISO 10918-1 B.2.2; SOF55 for JPEG-LS) and first scan (SOS)."""
    if frame[:2] != b"\xff\xd8":
        return None
    offset = 2
    size = len(frame)
    dimensions: tuple[int, int, int] | None = None
    while offset + 4 <= size:
        if frame[offset] != 0xFF:
            return None
        marker = frame[offset + 1]
        if marker == 0xFF:  # fill byte before a marker (B.1.1.2)
            offset += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            offset += 2
            continue
        if marker == 0xD9:  # EOI before any scan
            break
        (length,) = struct.unpack(">H", frame[offset + 2 : offset + 4])
        if length < 2:
            return None
        is_sof = (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7
        if is_sof and dimensions is None:
            if offset + 10 > size:
                return None
            height, width = struct.unpack(">HH", frame[offset + 5 : offset + 9])
            dimensions = (height, width, frame[offset + 9])
        if marker == 0xDA:  # SOS: the first scan's data follows its header
            if dimensions is None:
                return None
            return _CodestreamLayout(*dimensions, data_start=offset + 2 + length)
        offset += 2 + length
    if dimensions is None:
        return None
    return _CodestreamLayout(*dimensions, data_start=None)


def _j2k_layout(frame: bytes) -> _CodestreamLayout | None:
    """Image size from the SIZ segment (ISO 15444-1 A.5.1) and the first SOD marker."""
    offset = 0
    if frame[4:8] == b"jP  ":
        # A JP2 file instead of a bare codestream: find the contiguous codestream box.
        while offset + 8 <= len(frame):
            (length,) = struct.unpack(">I", frame[offset : offset + 4])
            if frame[offset + 4 : offset + 8] == b"jp2c":
                offset += 8
                break
            if length < 8:
                return None
            offset += length
        else:
            return None
    siz = frame[offset : offset + 42]
    if len(siz) < 42 or siz[:4] != b"\xff\x4f\xff\x51":
        return None
    xsiz, ysiz, x_origin, y_origin = struct.unpack(">IIII", siz[8:24])
    (components,) = struct.unpack(">H", siz[40:42])
    if xsiz <= x_origin or ysiz <= y_origin:
        return None
    start_of_data = frame.find(b"\xff\x93", offset + 42)  # SOD
    return _CodestreamLayout(
        ysiz - y_origin,
        xsiz - x_origin,
        components,
        data_start=start_of_data + 2 if start_of_data >= 0 else None,
    )


def _check_rle_header(frame: bytes, header: PhotographHeader) -> None:
    """The RLE header's segment count must match the samples (PS3.5 G.3.1, G.5)."""
    if len(frame) < 64:
        raise PhotographError(
            RefusalReason.CORRUPT_PIXEL_DATA,
            "The RLE pixel data is shorter than its 64-byte header.",
        )
    (segments,) = struct.unpack("<I", frame[:4])
    expected = header.samples_per_pixel * header.bits_allocated // 8
    if segments != expected:
        raise PhotographError(
            RefusalReason.CORRUPT_PIXEL_DATA,
            f"The RLE header lists {segments} segments where {expected} are needed.",
        )


# --- decoding -----------------------------------------------------------------------------


def _decode_rgb(dataset: Dataset, header: PhotographHeader) -> np.ndarray:
    """Decode the one frame and turn it into ``rows x columns x 3`` ``uint8`` RGB."""
    pixels, photometric, bits_stored = _decode_frame(dataset, header)
    if header.photometric_interpretation == _PALETTE:
        return _palette_to_rgb(dataset, pixels)
    if header.samples_per_pixel == 1:
        grey = _grey_to_uint8(dataset, pixels, header, bits_stored)
        return np.ascontiguousarray(np.repeat(grey[:, :, np.newaxis], 3, axis=2))
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        # Only reached when the decoder left YCbCr as it was: convert once, here.
        pixels = convert_color_space(pixels, "YBR_FULL", "RGB")
    elif photometric != "RGB":
        raise PhotographError(
            RefusalReason.UNSUPPORTED_PHOTOMETRIC,
            f"The decoder returned {photometric} samples, which dermpacs cannot turn into RGB.",
        )
    return np.ascontiguousarray(
        _scale_to_uint8(pixels, bits_stored, header.pixel_representation == 1)
    )


def _decode_frame(dataset: Dataset, header: PhotographHeader) -> tuple[np.ndarray, str, int]:
    """Return the decoded samples, the colour space they are in, and their bits stored.

    The one place where pixels are decoded in full, from the checked header alone (the
    8-bit colour JPEG read by pillow, at full or reduced scale, is :func:`_decode_jpeg_pillow`).
    """
    syntax = UID(header.transfer_syntax_uid)
    decoder = get_decoder(syntax)
    options: dict[str, Any] = {
        "rows": header.rows,
        "columns": header.columns,
        "samples_per_pixel": header.samples_per_pixel,
        "bits_allocated": header.bits_allocated,
        "bits_stored": header.bits_stored,
        "pixel_representation": header.pixel_representation,
        "photometric_interpretation": header.photometric_interpretation,
        "number_of_frames": 1,
        "allow_excess_frames": False,
        "pixel_keyword": "PixelData",
    }
    if header.samples_per_pixel > 1:
        options["planar_configuration"] = header.planar_configuration
    source: bytes = _pixel_data_bytes(dataset)
    if syntax.is_encapsulated:
        source = _first_frame(source, header)
        # Re-encapsulating the one frame keeps pydicom from looking for more frames.
        source = _encapsulate_one(source)
    plugins: tuple[str, ...] = ("",)  # native data: pydicom reads it itself
    if syntax.is_encapsulated:
        plugins = decoding_plugins(syntax)
        if not plugins:
            raise PhotographError(
                RefusalReason.UNSUPPORTED_TRANSFER_SYNTAX,
                f"No decoder for {_uid_name(syntax)} is installed.",
            )
    failures: list[str] = []
    for plugin in plugins:
        try:
            array, properties = decoder.as_array(
                source, index=0, validate=True, decoding_plugin=plugin, **options
            )
            break
        except MemoryError:
            raise
        except Exception as exc:  # decoders raise what their libraries raise
            failures.append(f"{plugin or 'pydicom'}: {_describe(exc)}")
    else:
        raise PhotographError(
            RefusalReason.CORRUPT_PIXEL_DATA,
            f"The {_uid_name(syntax)} pixel data could not be decoded ({'; '.join(failures)}).",
        )
    expected_shape: tuple[int, ...] = (header.rows, header.columns)
    if header.samples_per_pixel > 1:
        expected_shape += (header.samples_per_pixel,)
    if array.shape != expected_shape:
        raise PhotographError(
            RefusalReason.CORRUPT_PIXEL_DATA,
            f"The decoded pixel data has shape {array.shape}, not {expected_shape}.",
        )
    photometric = str(properties.get("photometric_interpretation", "RGB"))
    bits_stored = int(properties.get("bits_stored", header.bits_stored))
    return array, photometric, min(bits_stored, array.dtype.itemsize * 8)


def _encapsulate_one(frame: bytes) -> bytes:
    return encapsulate([frame], has_bot=False)


def _pillow_jpeg(header: PhotographHeader) -> bool:
    """Whether the photo is an 8-bit colour DCT JPEG, which pillow's libjpeg-turbo decodes (at
    full or reduced scale) to RGB in one pass."""
    return (
        header.transfer_syntax_uid in _DCT_SCALABLE_SYNTAXES
        and header.samples_per_pixel == 3
        and header.bits_stored == 8
        and header.photometric_interpretation in ("YBR_FULL_422", "YBR_FULL", "RGB")
    )


def _decode_jpeg_pillow(
    frame: bytes, header: PhotographHeader, reduction: int
) -> np.ndarray | None:
    """Decode a JPEG frame to RGB with pillow's libjpeg, at ``1 / reduction`` scale, or None.

    ``reduction`` 1 decodes in full; 2, 4 and 8 use libjpeg's DCT scaling. None means "use
    pydicom's decoders instead": the frame is not one pillow's libjpeg reads this way (12-bit
    samples, unusual components) or it does not decode. Falling back keeps the refusals of
    the pydicom path: its decoders include pillow, so a frame pillow cannot read is refused
    there with the usual reason, and one it can read would be read there too.
    """
    rows, columns = reduced_shape(header.rows, header.columns, reduction)
    try:
        with Image.open(BytesIO(frame), formats=("JPEG",)) as image:
            # Mode RGB: pillow found three components it converts to RGB (YCbCr, or RGB as
            # the codestream says); CMYK, greyscale or anything else goes the full way.
            if image.mode != "RGB" or image.size != (header.columns, header.rows):
                return None
            if reduction > 1:
                # draft() picks the largest DCT scale whose output is at least the size asked
                # for; asking for the rounded-down size gives exactly 1 / reduction.
                image.draft(
                    "RGB",
                    (max(1, header.columns // reduction), max(1, header.rows // reduction)),
                )
            if image.size != (columns, rows):
                return None
            image.load()
            rgb = np.asarray(image)
    except MemoryError:
        raise
    except Exception:  # pillow raises what libjpeg reports; the full decoders judge the data
        return None
    if rgb.shape != (rows, columns, 3) or rgb.dtype != np.uint8:
        return None
    return rgb


def _scale_to_uint8(pixels: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Map the full range of Bits Stored linearly onto 0-255."""
    if pixels.dtype == np.uint8 and bits_stored == 8 and not signed:
        return pixels
    low = -(1 << (bits_stored - 1)) if signed else 0
    high = low + (1 << bits_stored) - 1
    return _linear_to_uint8(pixels, float(low), float(high))


def _linear_to_uint8(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (pixels.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _grey_to_uint8(
    dataset: Dataset, pixels: np.ndarray, header: PhotographHeader, bits_stored: int
) -> np.ndarray:
    """Greyscale to display values: a VOI window when one is given, then MONOCHROME1 inverted.

    8-bit greyscale photos are used as they are. Deeper samples use the first VOI window
    of the header (PS3.3 C.11.2.1.2, after any Modality rescale) and otherwise the full
    range of Bits Stored, so that the picture is not stretched by its own content.
    """
    signed = header.pixel_representation == 1
    window = _voi_window(dataset) if bits_stored > 8 else None
    if window is None:
        grey = _scale_to_uint8(pixels, bits_stored, signed)
    else:
        slope, intercept, centre, width = window
        values = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        # The linear VOI function of PS3.3 C.11.2.1.2.1.
        low = centre - 0.5 - (width - 1) / 2
        high = centre - 0.5 + (width - 1) / 2
        grey = _linear_to_uint8(values, low, high)
    if header.photometric_interpretation == "MONOCHROME1":
        grey = 255 - grey  # MONOCHROME1: the lowest value is white (PS3.3 C.7.6.3.1.2)
    return grey


def _voi_window(dataset: Dataset) -> tuple[float, float, float, float] | None:
    try:
        centre = _first_number(_value(dataset, "WindowCenter"))
        width = _first_number(_value(dataset, "WindowWidth"))
        slope = _first_number(_value(dataset, "RescaleSlope"))
        intercept = _first_number(_value(dataset, "RescaleIntercept"))
    except PhotographError:
        return None  # a broken window is ignored: it only affects the display range
    if centre is None or width is None or width < 1:
        return None
    return (1.0 if slope is None or slope == 0 else slope), (intercept or 0.0), centre, width


def _first_number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        if not value:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _palette_to_rgb(dataset: Dataset, indices: np.ndarray) -> np.ndarray:
    try:
        rgb = apply_color_lut(indices, dataset)
    except MemoryError:
        raise
    except Exception as exc:
        raise PhotographError(
            RefusalReason.INVALID_HEADER,
            f"The PALETTE COLOR lookup tables cannot be applied ({_describe(exc)}).",
        ) from exc
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise PhotographError(
            RefusalReason.INVALID_HEADER,
            f"The PALETTE COLOR lookup tables gave an array of shape {rgb.shape}.",
        )
    rgb = rgb[:, :, :3]
    if rgb.dtype != np.uint8:
        # 16-bit palette entries (PS3.3 C.7.6.3.1.5): 65535 is full intensity.
        rgb = _linear_to_uint8(rgb, 0.0, 65535.0)
    return np.ascontiguousarray(rgb)


# --- message helpers ----------------------------------------------------------------------


def _uid_name(value: str) -> str:
    uid = UID(value)
    name = uid.name
    return name if name and name != str(uid) else "unknown object type"


def _accepted_classes_text() -> str:
    names = [
        _uid_name(uid).removesuffix(" Storage")
        + (" with one frame" if uid == MULTIFRAME_TRUE_COLOR_SC_IMAGE else "")
        for uid in PHOTO_SOP_CLASSES
    ]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _spaced(keyword: str) -> str:
    """'SOPInstanceUID' -> 'SOP Instance UID', for messages."""
    words: list[str] = []
    current = ""
    for index, char in enumerate(keyword):
        following = keyword[index + 1] if index + 1 < len(keyword) else ""
        starts_word = (
            char.isupper()
            and current
            and (not current[-1].isupper() or (following and following.islower()))
        )
        if starts_word:
            words.append(current)
            current = char
        else:
            current += char
    words.append(current)
    return " ".join(words)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(exc: BaseException) -> str:
    """A library's exception as one short line (pydicom lists each plug-in's on its own)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines) if lines else type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _unparseable(tag: int, exc: BaseException) -> PhotographError:
    return PhotographError(
        RefusalReason.UNPARSEABLE,
        f"Element {_tag_text(tag)} cannot be read ({_describe(exc)}).",
    )


__all__ = [
    "DEFAULT_MAX_MEGAPIXELS",
    "SUPPORTED_PHOTOMETRICS",
    "Photograph",
    "PhotographError",
    "PhotographHeader",
    "REDUCTIONS",
    "RefusalReason",
    "check_photograph",
    "choose_reduction",
    "parse_dicom_file",
    "read_photograph",
    "read_photograph_bytes",
    "reduced_shape",
]
