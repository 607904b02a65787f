"""Reading photographs at reduced scale: JPEG by DCT scaling, the rest averaged down, the same
refusals as a full read, and the full size kept for mapping results back."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

from dermpacs.imaging.decode import (
    PhotographError,
    RefusalReason,
    ScaledPhotograph,
    check_photograph,
    choose_reduction,
    parse_dicom_file,
    read_photograph,
    read_photograph_scaled,
    reduced_shape,
)
from tests.photos import (
    PHOTO_KINDS,
    PhotoKind,
    dicom_bytes,
    make_basic_text_sr,
    make_ct_slice,
    make_img2dcm_photo,
    make_multiframe_photo,
    make_oversized_header,
    make_photo,
    skin_photo_rgb,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# The kinds libjpeg decodes at reduced scale: 8-bit colour DCT JPEG.
_DCT_KINDS = {
    kind.name
    for kind in PHOTO_KINDS
    if kind.transfer_syntax_uid in (JPEGBaseline8Bit, JPEGExtended12Bit)
    and not kind.photometric.startswith("MONOCHROME")
}


def _averaged(rgb: np.ndarray, reduction: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).reduce(reduction))


# --- choosing the reduction ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "columns", "target", "expected"),
    [
        (3000, 4000, 512, 4),  # 1/8 would give 500 < 512
        (3000, 4000, 500, 8),
        (3000, 4000, 1000, 4),
        (3000, 4000, 1001, 2),
        (3000, 4000, 2000, 2),
        (3000, 4000, 2001, 1),
        (3000, 4000, 9000, 1),  # smaller than the target: full size
        (4001, 3001, 501, 8),  # rounded up: ceil(4001 / 8) = 501
        (1, 1, 512, 1),
        (96, 128, 32, 4),
    ],
)
def test_the_largest_reduction_that_keeps_the_target_is_chosen(
    rows: int, columns: int, target: int, expected: int
) -> None:
    assert choose_reduction(rows, columns, target) == expected
    assert max(reduced_shape(rows, columns, expected)) >= min(target, max(rows, columns))


@pytest.mark.parametrize("target", [0, -5, 1.5, True, "512"])
def test_target_must_be_a_positive_integer(target: object) -> None:
    ds, _ = make_photo("vlp-jpeg-baseline-ybr-422")
    with pytest.raises(ValueError, match="target_long_side"):
        read_photograph_scaled(ds, target_long_side=target)  # type: ignore[arg-type]


# --- every kind reads at reduced scale ----------------------------------------------------


@pytest.mark.parametrize("kind", PHOTO_KINDS, ids=lambda kind: kind.name)
def test_every_kind_reads_at_quarter_scale_close_to_a_reduced_full_read(kind: PhotoKind) -> None:
    ds, _ = make_photo(kind)
    full = read_photograph(ds)

    scaled = read_photograph_scaled(ds, target_long_side=32)

    assert scaled.reduction == 4
    assert scaled.rgb.shape == (24, 32, 3)
    assert scaled.rgb.dtype == np.uint8
    assert scaled.rgb.flags.c_contiguous and not scaled.rgb.flags.writeable
    assert (scaled.rows, scaled.columns) == scaled.source_shape == (96, 128)
    assert scaled.dct_scaled == (kind.name in _DCT_KINDS)
    assert scaled.sop_instance_uid == full.sop_instance_uid
    assert scaled.study_instance_uid == full.study_instance_uid
    assert scaled.series_instance_uid == full.series_instance_uid
    assert scaled.sop_class_uid == full.sop_class_uid
    assert scaled.transfer_syntax_uid == full.transfer_syntax_uid
    assert scaled.photometric_interpretation == full.photometric_interpretation
    assert scaled.lossy_compression == full.lossy_compression

    reference = _averaged(full.rgb, 4).astype(np.int16)
    difference = np.abs(scaled.rgb.astype(np.int16) - reference)
    if scaled.dct_scaled:
        # The DCT-scaled picture is not a box average, but a close one: no colour shift (a
        # missing or doubled YCbCr conversion moves every pixel by tens of levels).
        assert difference.mean() < 2.0, difference.mean()
        assert (
            np.abs(scaled.rgb.reshape(-1, 3).mean(0) - reference.reshape(-1, 3).mean(0)).max() < 1.0
        )
    else:
        assert difference.max() == 0


@pytest.mark.parametrize(("rows", "columns"), [(97, 129), (1, 1), (7, 300), (301, 5)])
@pytest.mark.parametrize("target", [1, 20, 40, 80])
def test_odd_sizes_round_up_like_the_codec(rows: int, columns: int, target: int) -> None:
    ds, _ = make_photo("vlp-jpeg-baseline-ybr-420-as-422", rows=rows, columns=columns)
    scaled = read_photograph_scaled(ds, target_long_side=target)
    reduction = choose_reduction(rows, columns, target)
    assert scaled.reduction == reduction
    assert scaled.rgb.shape == (*reduced_shape(rows, columns, reduction), 3)
    assert scaled.source_shape == (rows, columns)
    reference = _averaged(read_photograph(ds).rgb, reduction).astype(np.int16)
    # A partial last block is padded by the encoder and averaged over fewer pixels by
    # Image.reduce: compare the whole blocks. Strips a few pixels thin are nearly all edge
    # and chroma subsampling, hence the looser bound there (a colour error is tens of levels).
    whole = (max(1, rows // reduction), max(1, columns // reduction))
    difference = np.abs(scaled.rgb.astype(np.int16) - reference)[: whole[0], : whole[1]]
    assert difference.mean() < (4.0 if min(rows, columns) > 16 else 8.0)


def test_photo_smaller_than_the_target_is_read_in_full() -> None:
    ds, _ = make_photo("img2dcm-vlp-jpeg-baseline")
    scaled = read_photograph_scaled(ds, target_long_side=512)
    assert scaled.reduction == 1 and not scaled.dct_scaled
    assert np.array_equal(scaled.rgb, read_photograph(ds).rgb)


def test_camera_photo_from_img2dcm_decodes_at_half_scale_in_its_true_colours(
    tmp_path: Path,
) -> None:
    # The camera stand-in: JFIF-less YCbCr 4:2:0 JPEG labelled YBR_FULL_422 by img2dcm.
    original = skin_photo_rgb(600, 800, seed=3)
    ds = parse_dicom_file(make_img2dcm_photo(tmp_path, original))
    assert ds.PhotometricInterpretation == "YBR_FULL_422"

    scaled = read_photograph_scaled(ds, target_long_side=300)

    assert scaled.dct_scaled and scaled.reduction == 2
    assert scaled.rgb.shape == (300, 400, 3)
    full = read_photograph(ds).rgb
    resized = np.asarray(Image.fromarray(full).resize((400, 300), Image.Resampling.BOX))
    difference = np.abs(scaled.rgb.astype(np.int16) - resized.astype(np.int16))
    assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 12
    # Against the picture itself: channels in place, converted once.
    truth = _averaged(original, 2).astype(np.int16)
    assert np.abs(scaled.rgb.astype(np.int16) - truth).mean() < 4.0


def test_scaled_photograph_checks_its_own_shape() -> None:
    fields = dict(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.4",
        sop_instance_uid="1.2.3",
        study_instance_uid="1.2.4",
        series_instance_uid="1.2.5",
        transfer_syntax_uid=str(JPEGBaseline8Bit),
        photometric_interpretation="YBR_FULL_422",
        rows=97,
        columns=129,
        dct_scaled=True,
    )
    ScaledPhotograph(rgb=np.zeros((25, 33, 3), np.uint8), reduction=4, **fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        ScaledPhotograph(rgb=np.zeros((24, 32, 3), np.uint8), reduction=4, **fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction"):
        ScaledPhotograph(rgb=np.zeros((33, 43, 3), np.uint8), reduction=3, **fields)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ScaledPhotograph(rgb=np.zeros((25, 33, 3), np.float32), reduction=4, **fields)  # type: ignore[arg-type]


# --- the same refusals --------------------------------------------------------------------


def _jpeg_with(change: str) -> pydicom.Dataset:
    ds, _ = make_photo("vlp-jpeg-baseline-ybr-422")
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    if change == "cut-half":
        frame = frame[: len(frame) // 2]
    elif change == "cut-headers":
        frame = frame[: frame.index(b"\xff\xda")]
    elif change == "bomb":
        sof = frame.index(b"\xff\xc0")
        frame[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)
    elif change == "garbage":
        frame = bytearray(b"\x00" * 64)
    elif change == "broken-huffman":
        dht = frame.index(b"\xff\xc4")
        frame[dht + 5 : dht + 21] = b"\xff" * 16  # code counts that overflow the table
    ds.PixelData = encapsulate([bytes(frame)])
    return ds


def _without(keyword: str) -> pydicom.Dataset:
    ds, _ = make_photo("vlp-jpeg-baseline-ybr-422")
    delattr(ds, keyword)
    return ds


_REFUSED = {
    "ct-slice": make_ct_slice,
    "basic-text-sr": make_basic_text_sr,
    "two-frames": make_multiframe_photo,
    "61-megapixels": make_oversized_header,
    "jpeg-cut-half": lambda: _jpeg_with("cut-half"),
    "jpeg-cut-headers": lambda: _jpeg_with("cut-headers"),
    "jpeg-bomb": lambda: _jpeg_with("bomb"),
    "jpeg-garbage": lambda: _jpeg_with("garbage"),
    "jpeg-broken-huffman": lambda: _jpeg_with("broken-huffman"),
    "no-pixel-data": lambda: _without("PixelData"),
    "no-study-uid": lambda: _without("StudyInstanceUID"),
    "no-rows": lambda: _without("Rows"),
}


@pytest.mark.parametrize("name", sorted(_REFUSED))
def test_refusals_are_those_of_the_full_read(name: str) -> None:
    ds = _REFUSED[name]()
    with pytest.raises(PhotographError) as full:
        read_photograph(ds)
    with pytest.raises(PhotographError) as scaled:
        read_photograph_scaled(ds, target_long_side=16)
    assert scaled.value.reason is full.value.reason
    assert str(scaled.value) == str(full.value)


def test_size_limit_applies_to_the_full_size_not_the_reduced_one() -> None:
    ds, _ = make_photo("vlp-jpeg-baseline-ybr-422")  # 96 x 128
    with pytest.raises(PhotographError) as caught:
        read_photograph_scaled(ds, target_long_side=16, max_megapixels=0.01)
    assert caught.value.reason is RefusalReason.TOO_LARGE


_SMALL_JPEG = dicom_bytes(make_photo("vlp-jpeg-baseline-ybr-422", rows=48, columns=64)[0])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    edits=st.lists(
        st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    ),
)
def test_mutated_jpeg_is_refused_or_read_as_the_full_read_decides(
    edits: list[tuple[int, int]],
) -> None:
    data = bytearray(_SMALL_JPEG)
    for position, value in edits:
        data[position % len(data)] = value
    try:
        ds = parse_dicom_file(bytes(data))
    except PhotographError:
        return
    try:
        full = read_photograph(ds)
    except PhotographError as error:
        with pytest.raises(PhotographError) as scaled_error:
            read_photograph_scaled(ds, target_long_side=16)
        assert scaled_error.value.reason is error.reason
    else:
        scaled = read_photograph_scaled(ds, target_long_side=16)
        assert scaled.rgb.shape == (*reduced_shape(full.rows, full.columns, scaled.reduction), 3)


# --- the full read of a camera JPEG goes through pillow's libjpeg-turbo too ---------------


@pytest.mark.parametrize("kind", sorted(_DCT_KINDS))
def test_full_read_of_colour_jpeg_agrees_with_pydicoms_decoders(kind: str) -> None:
    from dermpacs.imaging import decode

    ds, _ = make_photo(kind, rows=240, columns=320)
    fast = read_photograph(ds).rgb.astype(np.int16)
    header = check_photograph(ds)
    reference = decode._decode_rgb(ds, header).astype(np.int16)  # pydicom's plug-ins
    difference = np.abs(fast - reference)
    # Two libjpeg implementations: IDCT rounding and chroma upsampling differ by a few levels.
    assert difference.mean() < 1.0, difference.mean()
    assert np.percentile(difference, 99.9) <= 12


def test_full_read_falls_back_to_pydicom_when_pillow_cannot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dermpacs.imaging import decode

    ds, _ = make_photo("img2dcm-vlp-jpeg-baseline")
    calls: list[int] = []

    def no_pillow(frame: bytes, header: object, reduction: int) -> None:
        calls.append(reduction)
        return None

    monkeypatch.setattr(decode, "_decode_jpeg_pillow", no_pillow)
    photo = read_photograph(ds)
    assert calls == [1]
    monkeypatch.undo()
    assert np.abs(photo.rgb.astype(np.int16) - read_photograph(ds).rgb).mean() < 1.0


# --- the preview beside a full read (the worker's segmentation input) ----------------------


@pytest.mark.parametrize("kind", [k for k in PHOTO_KINDS if k.name in _DCT_KINDS], ids=str)
def test_full_read_with_preview_gives_the_scaled_read(kind: PhotoKind) -> None:
    dataset, _ = make_photo(kind, rows=120, columns=160)
    scaled = read_photograph_scaled(dataset, target_long_side=40)
    if not scaled.dct_scaled:
        pytest.skip(f"{kind.name}: the codec does not scale this one")
    photo = read_photograph(dataset, preview_long_side=40)
    assert np.array_equal(photo.rgb, read_photograph(dataset).rgb)
    assert photo.preview is not None and photo.preview.shape == (30, 40, 3)
    assert np.array_equal(photo.preview, scaled.rgb)
    assert not photo.preview.flags.writeable


@pytest.mark.parametrize("kind", ["vlp-explicit-rgb", "vlp-jpeg-baseline-ybr-422"])
def test_no_preview_where_the_codec_cannot_scale_or_nothing_is_gained(kind: str) -> None:
    dataset, _ = make_photo(kind, rows=120, columns=160)
    # native pixels: reducing would mean decoding in full again; a target above half the
    # size: no DCT scale fits
    long_side = 40 if kind == "vlp-explicit-rgb" else 100
    assert read_photograph(dataset, preview_long_side=long_side).preview is None
    assert read_photograph(dataset).preview is None
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="preview_long_side"):
            read_photograph(dataset, preview_long_side=bad)  # type: ignore[arg-type]
