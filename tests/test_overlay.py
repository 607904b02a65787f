"""Burned-in overlay Secondary Capture: validated, drawn where the result is."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest
from dicomcheck import (
    SourcePhoto,
    dciodvfy_errors,
    make_analysis,
    make_sources,
    roundtrip,
    synthetic_photo,
)
from scipy import ndimage

from dermpacs.analysis import BACKGROUND, LESION, QualityFlag
from dermpacs.imaging.derived import ResultBuildError
from dermpacs.imaging.overlay import CROP_BOX_RGB, build_overlay, render_overlay
from dermpacs.imaging.seg import LESION_DISPLAY_RGB, SKIN_DISPLAY_RGB
from dermpacs.imaging.uids import UidKind, derive_uid

VERSION = "0.1.0"
WHEN = datetime(2024, 5, 1, 12, 30, 15)
ROWS, COLUMNS = 240, 320


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SourcePhoto]:
    return {s.kind: s for s in make_sources(tmp_path_factory.mktemp("photos"), ROWS, COLUMNS)}


@pytest.fixture(params=["vl-photographic", "secondary-capture", "img2dcm-vlp"])
def source(request: pytest.FixtureRequest, sources: dict[str, SourcePhoto]) -> SourcePhoto:
    return sources[request.param]


def _build(source: SourcePhoto, **kwargs: object):  # type: ignore[no-untyped-def]
    analysis = kwargs.pop("analysis", None) or make_analysis(
        synthetic_photo(ROWS, COLUMNS)[1], quality_flags=(QualityFlag.BLUR,)
    )
    uid = source.dataset.SOPInstanceUID
    return build_overlay(
        source.dataset,
        source.rgb,
        analysis,
        algorithm_version=VERSION,
        series_instance_uid=derive_uid(uid, VERSION, UidKind.OVERLAY_SERIES),
        sop_instance_uid=derive_uid(uid, VERSION, UidKind.OVERLAY_INSTANCE),
        content_datetime=WHEN,
        **kwargs,
    )


def test_overlay_validates_and_is_marked_burned_in(source: SourcePhoto) -> None:
    overlay = _build(source)
    assert dciodvfy_errors(overlay) == []
    read = roundtrip(overlay)
    assert read.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert read.BurnedInAnnotation == "YES"
    assert read.PhotometricInterpretation == "RGB"
    assert read.StudyInstanceUID == source.dataset.StudyInstanceUID
    assert read.SeriesInstanceUID != source.dataset.SeriesInstanceUID
    assert read.SourceImageSequence[0].ReferencedSOPInstanceUID == source.dataset.SOPInstanceUID
    assert read.ConversionType == "WSD"
    assert read.DateOfSecondaryCapture == "20240501"
    (equipment,) = [
        item for item in read.ContributingEquipmentSequence if item.Manufacturer == "dermpacs"
    ]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"


def test_lossy_source_marks_the_overlay_lossy(sources: dict[str, SourcePhoto]) -> None:
    assert _build(sources["img2dcm-vlp"]).LossyImageCompression == "01"
    assert _build(sources["vl-photographic"]).LossyImageCompression == "00"


def test_outlines_crop_boxes_and_legend_are_drawn_where_the_result_is(
    sources: dict[str, SourcePhoto],
) -> None:
    source = sources["vl-photographic"]
    _, label_map = synthetic_photo(ROWS, COLUMNS)
    analysis = make_analysis(label_map)
    pixels = roundtrip(_build(source, analysis=analysis)).pixel_array
    assert pixels.shape == (ROWS, COLUMNS, 3)

    lesion = label_map == LESION
    lesion_edge = lesion & ~ndimage.binary_erosion(lesion)
    lesion_coloured = np.all(pixels == LESION_DISPLAY_RGB, axis=-1)
    # below the legend, every lesion edge pixel is drawn in the lesion colour, and nothing
    # deep inside the lesion or outside the skin is
    below = np.zeros_like(lesion)
    below[ROWS // 3 :, :] = True
    assert lesion_coloured[lesion_edge & below].all()
    inner = ndimage.binary_erosion(lesion, iterations=4)
    assert not lesion_coloured[inner].any()
    skin = label_map != BACKGROUND
    skin_edge = skin & ~ndimage.binary_erosion(skin) & ~lesion
    assert np.all(pixels[skin_edge & below] == SKIN_DISPLAY_RGB)

    row0, col0, row1, col1 = analysis.crops[0].box
    assert np.all(pixels[row1 - 1, col0:col1] == CROP_BOX_RGB)
    assert np.all(pixels[row0:row1, col1 - 1][(np.arange(row0, row1) > ROWS // 3)] == CROP_BOX_RGB)

    # the legend panel in the top left is darker than the photo there and holds white text
    legend = pixels[:20, :100].astype(int)
    photo = source.rgb[:20, :100].astype(int)
    assert legend.mean() < photo.mean()
    assert (legend > 200).all(axis=-1).sum() > 20


def test_same_inputs_give_same_pixels_and_uids(source: SourcePhoto) -> None:
    first, second = _build(source), _build(source)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.PixelData == second.PixelData


def test_large_photos_are_scaled_down(sources: dict[str, SourcePhoto]) -> None:
    overlay = _build(sources["vl-photographic"], max_long_side=160)
    assert (overlay.Rows, overlay.Columns) == (120, 160)
    assert dciodvfy_errors(overlay) == []
    assert render_overlay(
        sources["vl-photographic"].rgb,
        make_analysis(synthetic_photo(ROWS, COLUMNS)[1]),
        algorithm_version=VERSION,
        max_long_side=None,
    ).shape == (ROWS, COLUMNS, 3)


def test_pixels_that_do_not_match_the_source_are_refused(sources: dict[str, SourcePhoto]) -> None:
    source = sources["vl-photographic"]
    wrong = SourcePhoto(source.kind, source.dataset, source.rgb[:, :, :2])
    with pytest.raises(ResultBuildError, match="uint8 of shape"):
        _build(wrong)
    wrong = SourcePhoto(source.kind, source.dataset, source.rgb.astype(np.float32))
    with pytest.raises(ResultBuildError, match="uint8 of shape"):
        _build(wrong)


def test_legend_fits_a_narrow_photo_and_starts_with_the_warning() -> None:
    # A portrait photo once lost "NOT FOR CLINICAL USE" past its right edge: the legend's
    # first line held the long model version before the warning.
    rgb, label_map = synthetic_photo(1200, 300)
    long_version = "seg-0.1.0-synthetic+f632903f/cls-0.1.0-synthetic+facd4451"
    plain = render_overlay(
        np.zeros_like(rgb), make_analysis(label_map), algorithm_version=long_version
    )
    # The text is white on a dark panel; no white pixel may touch the right-hand margin.
    panel = plain[:200]
    white = (panel > 200).all(axis=-1)
    assert white.any()
    columns = np.flatnonzero(white.any(axis=0))
    assert columns.max() < panel.shape[1] - 3
    # The warning is the first line: white text lies in the first text row band.
    first_band = white[: panel.shape[0] // 8]
    assert first_band.any()
