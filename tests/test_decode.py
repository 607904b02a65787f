"""Reading photographs: every supported kind decodes to the right RGB, everything else is
refused with one clear error, and no input makes the reader crash."""

from __future__ import annotations

import pickle
import struct
import tracemalloc
from io import BytesIO

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    MPEG2MPML,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from dermpacs.imaging.decode import (
    Photograph,
    PhotographError,
    PhotographHeader,
    RefusalReason,
    check_photograph,
    read_photograph,
    read_photograph_bytes,
)
from dermpacs.imaging.sopclasses import (
    ACCEPTED_TRANSFER_SYNTAXES,
    HTJ2K_TRANSFER_SYNTAXES,
    PHOTO_SOP_CLASSES,
    decoder_available,
)
from tests.photos import (
    PHOTO_KINDS,
    VL_PHOTOGRAPHIC,
    PhotoKind,
    dicom_bytes,
    grey_of,
    jpeg_bytes,
    make_basic_text_sr,
    make_ct_slice,
    make_img2dcm_photo,
    make_multiframe_photo,
    make_oversized_header,
    make_photo,
    photo_dataset,
    reference_decode,
    skin_photo,
    skin_photo_rgb,
)

# pydicom warns (and logs) about each odd value it meets; the broken inputs here are meant.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _refusal(reason: RefusalReason, read, *args, **kwargs) -> PhotographError:  # type: ignore[no-untyped-def]
    with pytest.raises(PhotographError) as caught:
        read(*args, **kwargs)
    assert caught.value.reason is reason, str(caught.value)
    assert len(str(caught.value)) > 20  # a sentence, not a code
    return caught.value


def _jpeg_photo(rows: int = 96, columns: int = 128) -> pydicom.Dataset:
    ds, _ = make_photo("vlp-jpeg-baseline-ybr-422", rows=rows, columns=columns)
    return ds


def _native_photo() -> pydicom.Dataset:
    ds, _ = make_photo("vlp-explicit-rgb")
    return ds


# --- what is accepted ---------------------------------------------------------------------


def test_accepted_transfer_syntaxes_put_compressed_first_and_all_have_decoders() -> None:
    syntaxes = list(ACCEPTED_TRANSFER_SYNTAXES)
    compressed = [uid.is_compressed for uid in syntaxes]
    assert compressed == sorted(compressed, reverse=True), "compressed syntaxes come first"
    assert syntaxes[-3:] == [
        UID("1.2.840.10008.1.2.1.99"),
        ExplicitVRLittleEndian,
        UID("1.2.840.10008.1.2"),
    ]
    assert all(decoder_available(uid) for uid in syntaxes)
    required = {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
    }
    assert required <= set(syntaxes), "a declared codec package is missing"
    for uid in HTJ2K_TRANSFER_SYNTAXES:
        assert (uid in syntaxes) == decoder_available(uid)
    assert ExplicitVRBigEndian not in syntaxes
    assert len(PHOTO_SOP_CLASSES) == 4


# --- every supported kind decodes ---------------------------------------------------------


@pytest.mark.parametrize("kind", PHOTO_KINDS, ids=lambda kind: kind.name)
def test_every_supported_kind_decodes_to_the_expected_rgb(kind: PhotoKind) -> None:
    ds, expected = make_photo(kind)
    assert ds.file_meta.TransferSyntaxUID == kind.transfer_syntax_uid  # the factory's promise

    photo = read_photograph(ds)

    assert photo.rgb.shape == (96, 128, 3)
    assert photo.rgb.dtype == np.uint8
    assert photo.rgb.flags.c_contiguous
    assert not photo.rgb.flags.writeable
    difference = np.abs(photo.rgb.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= kind.tolerance, f"max difference {difference.max()}"
    assert difference.mean() < 1.0, "a systematic error, not decoder rounding"

    # Against the picture itself: no swapped channels, no double colour conversion.
    original = skin_photo_rgb()
    if kind.photometric.startswith("MONOCHROME"):
        original = np.repeat(grey_of(original)[..., None], 3, axis=2)
    assert np.abs(photo.rgb.astype(np.int16) - original).mean() < 6

    assert (photo.rows, photo.columns) == (96, 128)
    assert photo.sop_class_uid == kind.sop_class_uid
    assert photo.transfer_syntax_uid == kind.transfer_syntax_uid
    assert photo.photometric_interpretation == kind.photometric
    assert photo.sop_instance_uid == ds.SOPInstanceUID
    assert photo.study_instance_uid == ds.StudyInstanceUID
    assert photo.series_instance_uid == ds.SeriesInstanceUID
    assert photo.lossy_compression == (ds.get("LossyImageCompression") == "01")

    from_file = read_photograph_bytes(dicom_bytes(ds))
    assert np.array_equal(from_file.rgb, photo.rgb)


def test_camera_file_from_img2dcm_with_empty_patient_fields_is_read_from_its_path(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    rgb = skin_photo_rgb(120, 160, seed=3)
    path = make_img2dcm_photo(tmp_path, rgb)
    ds = pydicom.dcmread(path)
    assert ds.PatientName == "" and ds.PatientID == ""
    assert "Laterality" not in ds and "AnatomicRegionSequence" not in ds

    photo = read_photograph_bytes(path)

    assert photo.photometric_interpretation == "YBR_FULL_422"
    assert photo.transfer_syntax_uid == JPEGBaseline8Bit
    assert photo.lossy_compression
    reference = reference_decode(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert np.abs(photo.rgb.astype(np.int16) - reference).max() <= 8


@pytest.mark.parametrize(("rows", "columns"), [(97, 129), (1, 1), (7, 300)])
def test_jpeg_of_odd_size_decodes(rows: int, columns: int) -> None:
    ds, expected = make_photo("vlp-jpeg-baseline-ybr-420-as-422", rows=rows, columns=columns)
    photo = read_photograph(ds)
    assert photo.rgb.shape == (rows, columns, 3)
    assert np.abs(photo.rgb.astype(np.int16) - expected).max() <= 8


def test_mislabelled_jfif_jpeg_marked_rgb_is_converted_once() -> None:
    # Some systems wrap a YCbCr JFIF JPEG and write RGB: the codestream decides.
    rgb = skin_photo_rgb()
    frame = jpeg_bytes(rgb)
    ds = photo_dataset(rgb, photometric="RGB", transfer_syntax_uid=JPEGBaseline8Bit)
    ds.PixelData = encapsulate([frame])
    photo = read_photograph(ds)
    assert np.abs(photo.rgb.astype(np.int16) - reference_decode(frame)).max() <= 8


def test_dataset_decoded_off_the_network_without_file_meta_is_read() -> None:
    ds = pydicom.dcmread(BytesIO(dicom_bytes(_native_photo())))
    del ds.file_meta
    assert ds.original_encoding == (False, True)
    photo = read_photograph(ds)
    assert photo.transfer_syntax_uid == ExplicitVRLittleEndian
    assert np.array_equal(photo.rgb, skin_photo_rgb())


def test_compressed_dataset_without_transfer_syntax_is_refused() -> None:
    ds = _jpeg_photo()
    del ds.file_meta
    ds.set_original_encoding(None, None)  # type: ignore[arg-type]
    _refusal(RefusalReason.UNSUPPORTED_TRANSFER_SYNTAX, read_photograph, ds)


def test_check_photograph_reads_the_header_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(syntax: str) -> None:
        raise AssertionError("check_photograph must not decode pixels")

    monkeypatch.setattr("dermpacs.imaging.decode.get_decoder", no_decoding)
    header = check_photograph(_jpeg_photo())

    assert isinstance(header, PhotographHeader)
    assert (header.rows, header.columns, header.samples_per_pixel) == (96, 128, 3)
    assert header.photometric_interpretation == "YBR_FULL_422"
    assert header.transfer_syntax_uid == JPEGBaseline8Bit
    assert header.lossy_compression
    assert header.megapixels == pytest.approx(96 * 128 / 1e6)


def test_photograph_checks_its_own_shape_and_is_read_only() -> None:
    rgb = skin_photo_rgb()
    facts = dict(
        sop_class_uid=VL_PHOTOGRAPHIC,
        sop_instance_uid="1.2.3",
        study_instance_uid="1.2.4",
        series_instance_uid="1.2.5",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        photometric_interpretation="RGB",
    )
    photo = Photograph(rgb=rgb, rows=96, columns=128, **facts)
    assert rgb.flags.writeable, "the caller's array keeps its flags"
    with pytest.raises(ValueError):
        photo.rgb[0, 0, 0] = 1
    with pytest.raises(ValueError, match="shape"):
        Photograph(rgb=rgb, rows=128, columns=96, **facts)
    with pytest.raises(TypeError):
        Photograph(rgb=rgb.astype(np.uint16), rows=96, columns=128, **facts)


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_ct_slice, make_basic_text_sr], ids=["ct", "sr"])
def test_objects_that_are_not_photographs_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    ds = make()
    error = _refusal(RefusalReason.NOT_A_PHOTOGRAPH, read_photograph, ds)
    assert ds.SOPClassUID.name.removesuffix(" Storage") in str(error)
    _refusal(RefusalReason.NOT_A_PHOTOGRAPH, read_photograph_bytes, dicom_bytes(ds))


def test_two_frames_are_refused() -> None:
    ds = make_multiframe_photo(2)
    error = _refusal(RefusalReason.MULTI_FRAME, read_photograph, ds)
    assert "2 frames" in str(error)
    _refusal(RefusalReason.MULTI_FRAME, read_photograph_bytes, dicom_bytes(ds))


def test_61_megapixel_header_is_refused_without_allocating_its_pixels() -> None:
    data = dicom_bytes(make_oversized_header(61.0))
    assert len(data) < 10_000
    tracemalloc.start()
    try:
        error = _refusal(RefusalReason.TOO_LARGE, read_photograph_bytes, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"{peak} bytes allocated to refuse a header"
    assert "61.0 megapixels" in str(error) and "60 megapixels" in str(error)
    # With a higher limit the same header is refused for its missing pixels, still unread.
    _refusal(RefusalReason.TRUNCATED_PIXEL_DATA, read_photograph_bytes, data, max_megapixels=100)


def test_size_limit_is_configurable() -> None:
    ds = _native_photo()
    _refusal(RefusalReason.TOO_LARGE, read_photograph, ds, max_megapixels=0.01)
    assert read_photograph(ds, max_megapixels=0.0123).rows == 96
    with pytest.raises(ValueError, match="max_megapixels"):
        read_photograph(ds, max_megapixels=0)


def test_pixel_data_shorter_than_the_header_says_is_refused() -> None:
    ds = _native_photo()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    error = _refusal(RefusalReason.TRUNCATED_PIXEL_DATA, read_photograph, ds)
    assert str(96 * 128 * 3) in str(error)


def test_file_cut_inside_the_pixel_data_is_refused() -> None:
    data = dicom_bytes(_native_photo())
    _refusal(RefusalReason.TRUNCATED_PIXEL_DATA, read_photograph_bytes, data[:-1000])


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_compressed_file_cut_short_is_refused(keep: float) -> None:
    data = dicom_bytes(_jpeg_photo())
    with pytest.raises(PhotographError) as caught:
        read_photograph_bytes(data[: int(len(data) * keep)])
    assert caught.value.reason in (
        RefusalReason.TRUNCATED_PIXEL_DATA,
        RefusalReason.CORRUPT_PIXEL_DATA,
        RefusalReason.UNPARSEABLE,
    )


@pytest.mark.parametrize("cut", [10, 132, 200, 400, 700])
def test_file_cut_inside_the_header_is_unparseable(cut: int) -> None:
    data = dicom_bytes(_native_photo())
    _refusal(RefusalReason.UNPARSEABLE, read_photograph_bytes, data[:cut])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage" * 100,
        bytes(range(256)) * 8,
        b"\x00" * 128 + b"DICM" + b"\xff" * 300,
        b"\x00" * 128 + b"DICM",
    ],
    ids=["empty", "text", "bytes", "dicm-then-junk", "dicm-only"],
)
def test_garbage_is_unparseable(data: bytes) -> None:
    _refusal(RefusalReason.UNPARSEABLE, read_photograph_bytes, data)


def test_missing_file_is_a_local_error_not_a_refusal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError):
        read_photograph_bytes(tmp_path / "absent.dcm")


@pytest.mark.parametrize(
    ("change", "missing"),
    [
        (lambda ds: delattr(ds, "Rows"), "Rows"),
        (lambda ds: delattr(ds, "Columns"), "Columns"),
        (lambda ds: setattr(ds, "Columns", 0), "Columns"),
        (lambda ds: setattr(ds, "Rows", None), "Rows"),
    ],
    ids=["no-rows", "no-columns", "zero-columns", "empty-rows"],
)
def test_missing_rows_or_columns_are_refused(change, missing: str) -> None:  # type: ignore[no-untyped-def]
    ds = _native_photo()
    change(ds)
    error = _refusal(RefusalReason.MISSING_DIMENSIONS, read_photograph, ds)
    assert missing in str(error)
    _refusal(RefusalReason.MISSING_DIMENSIONS, read_photograph_bytes, dicom_bytes(ds))


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, MPEG2MPML, UID("1.2.3.4.5")])
def test_transfer_syntaxes_outside_the_list_are_refused(syntax: UID) -> None:
    ds = _native_photo()
    ds.file_meta.TransferSyntaxUID = syntax
    _refusal(RefusalReason.UNSUPPORTED_TRANSFER_SYNTAX, read_photograph, ds)


@pytest.mark.parametrize("photometric", ["CMYK", "ARGB", "HSV", "YBR_PARTIAL_422"])
def test_unsupported_photometric_interpretations_are_refused(photometric: str) -> None:
    ds = _native_photo()
    ds.PhotometricInterpretation = photometric
    _refusal(RefusalReason.UNSUPPORTED_PHOTOMETRIC, read_photograph, ds)


def test_photograph_without_pixel_data_is_refused() -> None:
    ds = _native_photo()
    del ds.PixelData
    _refusal(RefusalReason.NO_PIXEL_DATA, read_photograph, ds)
    _refusal(RefusalReason.NO_PIXEL_DATA, read_photograph_bytes, dicom_bytes(ds))


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_photograph_without_identifiers_is_refused(keyword: str) -> None:
    ds = _native_photo()
    setattr(ds, keyword, "")
    _refusal(RefusalReason.MISSING_IDENTIFIERS, read_photograph, ds)


_FORMAT = RefusalReason.UNSUPPORTED_PIXEL_FORMAT
_INVALID = RefusalReason.INVALID_HEADER


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda ds: setattr(ds, "BitsAllocated", 32), _FORMAT),
        (lambda ds: setattr(ds, "BitsAllocated", 1), _FORMAT),
        (lambda ds: setattr(ds, "FloatPixelData", b"\0" * 8), _FORMAT),
        (lambda ds: setattr(ds, "SamplesPerPixel", 1), _INVALID),
        (lambda ds: setattr(ds, "BitsStored", 12), _INVALID),
        (lambda ds: setattr(ds, "NumberOfFrames", 0), _INVALID),
        (lambda ds: setattr(ds, "PlanarConfiguration", 2), _INVALID),
        (lambda ds: setattr(ds, "PixelRepresentation", 3), _INVALID),
        (lambda ds: delattr(ds, "PhotometricInterpretation"), _INVALID),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "YBR_ICT"), _INVALID),
    ],
    ids=[
        "32-bit",
        "1-bit",
        "float",
        "rgb-one-sample",
        "stored-above-allocated",
        "zero-frames",
        "planar-2",
        "sign-3",
        "no-photometric",
        "ict-uncompressed",
    ],
)
def test_impossible_pixel_descriptions_are_refused(change, reason: RefusalReason) -> None:  # type: ignore[no-untyped-def]
    ds = _native_photo()
    ds.BitsStored = 8
    change(ds)
    _refusal(reason, read_photograph, ds)


def test_palette_photo_without_its_lookup_tables_is_refused() -> None:
    ds, _ = make_photo("sc-explicit-palette-16bit-lut")
    del ds.GreenPaletteColorLookupTableData
    error = _refusal(RefusalReason.INVALID_HEADER, read_photograph, ds)
    assert "green" in str(error)


def test_jpeg_larger_than_its_header_is_refused_before_decoding() -> None:
    ds = _jpeg_photo()
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = frame.index(b"\xff\xc0")
    frame[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)  # a decompression bomb
    ds.PixelData = encapsulate([bytes(frame)])
    error = _refusal(RefusalReason.CORRUPT_PIXEL_DATA, check_photograph, ds)
    assert "30000 x 30000" in str(error)


def test_jpeg_2000_with_other_dimensions_than_its_header_is_refused() -> None:
    ds, _ = make_photo("vlp-j2k-lossless-ybr-rct")
    ds.Rows = 48
    _refusal(RefusalReason.CORRUPT_PIXEL_DATA, check_photograph, ds)


@pytest.mark.parametrize("kind", ["vlp-jpeg-baseline-ybr-422", "vlp-jpegls-lossless-rgb"])
@pytest.mark.parametrize("keep", ["headers", "half"])
def test_jpeg_codestream_cut_short_is_refused(kind: str, keep: str) -> None:
    # JPEG decoders fill a cut-off picture with grey instead of failing: the reader must not.
    ds, _ = make_photo(kind)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    end = frame.index(b"\xff\xda") if keep == "headers" else len(frame) // 2
    ds.PixelData = encapsulate([frame[:end]])
    error = _refusal(RefusalReason.TRUNCATED_PIXEL_DATA, read_photograph, ds)
    assert "cut short" in str(error)


def test_jpeg_2000_codestream_cut_short_is_refused() -> None:
    ds, _ = make_photo("vlp-j2k-lossy-ybr-ict")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    _refusal(RefusalReason.TRUNCATED_PIXEL_DATA, read_photograph, ds)


def test_undecodable_compressed_data_is_refused() -> None:
    ds, _ = make_photo("vlp-rle-rgb")
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[8:12] = struct.pack("<I", 10**6)  # the second segment starts past the end
    ds.PixelData = encapsulate([bytes(frame)])
    error = _refusal(RefusalReason.CORRUPT_PIXEL_DATA, read_photograph, ds)
    assert "RLE Lossless" in str(error)


def test_compressed_data_without_a_codestream_is_refused() -> None:
    ds = _jpeg_photo()
    ds.PixelData = encapsulate([b"\x00" * 64])
    _refusal(RefusalReason.CORRUPT_PIXEL_DATA, read_photograph, ds)
    ds.PixelData = b"\x00" * 64  # not even encapsulated
    _refusal(RefusalReason.CORRUPT_PIXEL_DATA, read_photograph, ds)


def test_rle_with_the_wrong_number_of_segments_is_refused() -> None:
    ds, _ = make_photo("vlp-rle-rgb")
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[:4] = struct.pack("<I", 1)
    ds.PixelData = encapsulate([bytes(frame)])
    _refusal(RefusalReason.CORRUPT_PIXEL_DATA, read_photograph, ds)


def test_error_keeps_its_reason_across_processes() -> None:
    error = PhotographError(RefusalReason.TOO_LARGE, "The photograph is too large.")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ValueError)
    assert copy.reason is RefusalReason.TOO_LARGE
    assert str(copy) == "The photograph is too large."


# --- nothing else crashes -----------------------------------------------------------------

_SMALL_JPEG = dicom_bytes(make_photo("vlp-jpeg-baseline-ybr-422", rows=24, columns=32)[0])
_SMALL_NATIVE = dicom_bytes(make_photo("sc-explicit-palette-16bit-lut", rows=12, columns=16)[0])


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    source=st.sampled_from([_SMALL_JPEG, _SMALL_NATIVE]),
    edits=st.lists(
        st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    ),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=10**6)),
)
def test_mutated_files_only_ever_raise_photograph_error(
    source: bytes, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(source)
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    try:
        photo = read_photograph_bytes(bytes(data))
    except PhotographError as error:
        assert isinstance(error.reason, RefusalReason)
        assert str(error)
    else:
        assert photo.rgb.shape == (photo.rows, photo.columns, 3)
        assert photo.rgb.dtype == np.uint8


def test_label_map_of_the_test_picture_matches_its_colours() -> None:
    # The factory's picture is reused by writer and method tests: its labels must be right.
    rgb, labels = skin_photo()
    red_minus_blue = rgb[..., 0].astype(int) - rgb[..., 2].astype(int)
    assert red_minus_blue[labels == 0].mean() < 0 < red_minus_blue[labels == 1].mean()
    assert rgb[labels == 2][:, 1].mean() < rgb[labels == 1][:, 1].mean() - 50
    assert 0.05 < (labels == 2).mean() < 0.2 and 0.4 < (labels > 0).mean() < 0.7
