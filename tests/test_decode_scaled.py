"""The reduced-scale preview of a full read (the worker's segmentation input): JPEG decoded by
DCT scaling at the reduction :func:`choose_reduction` picks, rounded up like the codec, close to
the full read averaged down, no preview where the codec cannot scale, and the refusals, the size
limit and the full pixels exactly those of a read without a preview."""

from __future__ import annotations

import re
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
    Photograph,
    PhotographError,
    RefusalReason,
    check_photograph,
    choose_reduction,
    parse_dicom_file,
    read_photograph,
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


def _message(error: BaseException) -> str:
    """An error's text without object addresses (a decoder's message may name its BytesIO)."""
    return re.sub(r" at 0x[0-9a-f]+", " at 0x...", str(error))


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


@pytest.mark.parametrize(
    ("rows", "columns", "long_side", "shape"),
    [
        (96, 128, 16, (12, 16)),  # 1/8
        (96, 128, 17, (24, 32)),  # 1/8 is too small: 1/4
        (96, 128, 33, (48, 64)),  # 1/2
        (96, 128, 65, None),  # not even 1/2 keeps the long side: no preview
        (128, 96, 16, (16, 12)),  # portrait: the long side is the rows
    ],
)
def test_preview_has_the_chosen_reduction(
    rows: int, columns: int, long_side: int, shape: tuple[int, int] | None
) -> None:
    ds, _ = make_photo("vlp-jpeg-baseline-ybr-422", rows=rows, columns=columns)
    photo = read_photograph(ds, preview_long_side=long_side)
    reduction = choose_reduction(rows, columns, long_side)
    if shape is None:
        assert reduction == 1 and photo.preview is None
    else:
        assert photo.preview is not None
        assert photo.preview.shape == (*shape, 3) == (*reduced_shape(rows, columns, reduction), 3)


@pytest.mark.parametrize("long_side", [0, -5, 1.5, True, "512"])
def test_preview_long_side_must_be_a_positive_integer(long_side: object) -> None:
    ds, _ = make_photo("vlp-jpeg-baseline-ybr-422")
    with pytest.raises(ValueError, match="preview_long_side"):
        read_photograph(ds, preview_long_side=long_side)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target_long_side"):
        choose_reduction(96, 128, 0)


# --- every kind: a preview where the codec scales, None elsewhere --------------------------


@pytest.mark.parametrize("kind", PHOTO_KINDS, ids=lambda kind: kind.name)
def test_every_kind_gives_a_quarter_scale_preview_close_to_a_reduced_full_read_or_none(
    kind: PhotoKind,
) -> None:
    ds, _ = make_photo(kind)
    full = read_photograph(ds)

    photo = read_photograph(ds, preview_long_side=32)

    # The full read is untouched by the preview: same pixels, same facts.
    assert np.array_equal(photo.rgb, full.rgb)
    assert (photo.rows, photo.columns) == (96, 128)
    assert photo.sop_instance_uid == full.sop_instance_uid
    assert photo.transfer_syntax_uid == full.transfer_syntax_uid
    assert photo.photometric_interpretation == full.photometric_interpretation
    assert photo.lossy_compression == full.lossy_compression
    if kind.name not in _DCT_KINDS:
        # Native, lossless, JPEG 2000, greyscale ...: the codec cannot scale; the analysis
        # resizes the full read instead.
        assert photo.preview is None
        return

    preview = photo.preview
    assert preview is not None
    assert preview.shape == (24, 32, 3) and preview.dtype == np.uint8
    assert preview.flags.c_contiguous and not preview.flags.writeable
    reference = _averaged(full.rgb, 4).astype(np.int16)
    difference = np.abs(preview.astype(np.int16) - reference)
    # The DCT-scaled picture is not a box average, but a close one: no colour shift (a
    # missing or doubled YCbCr conversion moves every pixel by tens of levels).
    assert difference.mean() < 2.0, difference.mean()
    assert np.abs(preview.reshape(-1, 3).mean(0) - reference.reshape(-1, 3).mean(0)).max() < 1.0


@pytest.mark.parametrize(("rows", "columns"), [(97, 129), (1, 1), (7, 300), (301, 5)])
@pytest.mark.parametrize("target", [1, 20, 40, 80])
def test_odd_sizes_round_up_like_the_codec(rows: int, columns: int, target: int) -> None:
    ds, _ = make_photo("vlp-jpeg-baseline-ybr-420-as-422", rows=rows, columns=columns)
    photo = read_photograph(ds, preview_long_side=target)
    reduction = choose_reduction(rows, columns, target)
    if reduction == 1:
        assert photo.preview is None
        return
    if min(rows, columns) < reduction and photo.preview is None:
        # A strip thinner than the reduction: pillow's draft() picks its scale from the
        # rounded-down size asked for, which such a side may not give; no preview then.
        return
    assert photo.preview is not None
    assert photo.preview.shape == (*reduced_shape(rows, columns, reduction), 3)
    reference = _averaged(photo.rgb, reduction).astype(np.int16)
    # A partial last block is padded by the encoder and averaged over fewer pixels by
    # Image.reduce: compare the whole blocks. Strips a few pixels thin are nearly all edge
    # and chroma subsampling, hence the looser bound there (a colour error is tens of levels).
    whole = (max(1, rows // reduction), max(1, columns // reduction))
    difference = np.abs(photo.preview.astype(np.int16) - reference)[: whole[0], : whole[1]]
    assert difference.mean() < (4.0 if min(rows, columns) > 16 else 8.0)


def test_camera_photo_from_img2dcm_gives_a_half_scale_preview_in_its_true_colours(
    tmp_path: Path,
) -> None:
    # The camera stand-in: JFIF-less YCbCr 4:2:0 JPEG labelled YBR_FULL_422 by img2dcm.
    original = skin_photo_rgb(600, 800, seed=3)
    ds = parse_dicom_file(make_img2dcm_photo(tmp_path, original))
    assert ds.PhotometricInterpretation == "YBR_FULL_422"

    photo = read_photograph(ds, preview_long_side=300)

    assert photo.preview is not None and photo.preview.shape == (300, 400, 3)
    resized = np.asarray(Image.fromarray(photo.rgb).resize((400, 300), Image.Resampling.BOX))
    difference = np.abs(photo.preview.astype(np.int16) - resized.astype(np.int16))
    assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 12
    # Against the picture itself: channels in place, converted once.
    truth = _averaged(original, 2).astype(np.int16)
    assert np.abs(photo.preview.astype(np.int16) - truth).mean() < 4.0


def test_photograph_checks_its_previews_shape() -> None:
    fields = dict(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.4",
        sop_instance_uid="1.2.3",
        study_instance_uid="1.2.4",
        series_instance_uid="1.2.5",
        transfer_syntax_uid=str(JPEGBaseline8Bit),
        photometric_interpretation="YBR_FULL_422",
        rows=97,
        columns=129,
    )
    rgb = np.zeros((97, 129, 3), np.uint8)
    photo = Photograph(rgb=rgb, preview=np.zeros((25, 33, 3), np.uint8), **fields)  # type: ignore[arg-type]
    assert photo.preview is not None and not photo.preview.flags.writeable
    for preview in (
        np.zeros((24, 32, 3), np.uint8),  # rounded down, not up
        np.zeros((33, 43, 3), np.uint8),  # 1/3: not a DCT scale
        np.zeros((97, 129, 3), np.uint8),  # no reduction
        np.zeros((25, 33, 3), np.float32),
    ):
        with pytest.raises(ValueError, match="preview"):
            Photograph(rgb=rgb, preview=preview, **fields)  # type: ignore[arg-type]


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
    with pytest.raises(PhotographError) as with_preview:
        read_photograph(ds, preview_long_side=16)
    assert with_preview.value.reason is full.value.reason
    assert _message(with_preview.value) == _message(full.value)


def test_size_limit_applies_to_the_full_size_not_the_previews() -> None:
    ds, _ = make_photo("vlp-jpeg-baseline-ybr-422")  # 96 x 128: 0.0123 MP, 1/8 is 0.0002 MP
    with pytest.raises(PhotographError) as caught:
        read_photograph(ds, preview_long_side=16, max_megapixels=0.01)
    assert caught.value.reason is RefusalReason.TOO_LARGE
    photo = read_photograph(ds, preview_long_side=16, max_megapixels=0.013)
    assert photo.preview is not None and photo.preview.shape == (12, 16, 3)


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
        with pytest.raises(PhotographError) as preview_error:
            read_photograph(ds, preview_long_side=16)
        assert preview_error.value.reason is error.reason
        assert _message(preview_error.value) == _message(error)
    else:
        photo = read_photograph(ds, preview_long_side=16)
        assert np.array_equal(photo.rgb, full.rgb)
        if photo.preview is not None:  # None where the mutation left no scalable JPEG
            reduction = choose_reduction(full.rows, full.columns, 16)
            assert photo.preview.shape == (*reduced_shape(full.rows, full.columns, reduction), 3)


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
    photo = read_photograph(ds, preview_long_side=16)
    # No second try at reduced scale once the full decode went to pydicom: no preview.
    assert calls == [1] and photo.preview is None
    monkeypatch.undo()
    assert np.abs(photo.rgb.astype(np.int16) - read_photograph(ds).rgb).mean() < 1.0


@pytest.mark.parametrize("kind", ["vlp-explicit-rgb", "vlp-jpeg-baseline-ybr-422"])
def test_no_preview_where_the_codec_cannot_scale_or_nothing_is_gained(kind: str) -> None:
    dataset, _ = make_photo(kind, rows=120, columns=160)
    # native pixels: reducing would mean decoding in full again; a target above half the
    # size: no DCT scale fits
    long_side = 40 if kind == "vlp-explicit-rgb" else 100
    photo = read_photograph(dataset, preview_long_side=long_side)
    assert photo.preview is None
    assert np.array_equal(photo.rgb, read_photograph(dataset).rgb)
    assert read_photograph(dataset).preview is None
