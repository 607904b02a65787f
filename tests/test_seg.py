"""SEG builder and deterministic UIDs: validated by dciodvfy, read back by highdicom."""

from __future__ import annotations

import io
from datetime import datetime

import highdicom as hd
import numpy as np
import pytest
from dicomcheck import (
    SourcePhoto,
    dciodvfy_errors,
    make_sources,
    roundtrip,
    synthetic_photo,
)
from pydicom.sr.codedict import codes as dicom_codes

from dermpacs.analysis import BACKGROUND, LESION, SKIN
from dermpacs.imaging import codes
from dermpacs.imaging.derived import ResultBuildError
from dermpacs.imaging.seg import (
    LESION_DISPLAY_RGB,
    SEGMENT_LESION,
    SEGMENT_SKIN,
    SKIN_DISPLAY_RGB,
    build_segmentation,
)
from dermpacs.imaging.uids import UidError, UidKind, derive_uid

VERSION = "0.1.0"
WHEN = datetime(2024, 5, 1, 12, 30, 15)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SourcePhoto]:
    return {s.kind: s for s in make_sources(tmp_path_factory.mktemp("photos"))}


@pytest.fixture(params=["vl-photographic", "secondary-capture", "img2dcm-vlp"])
def source(request: pytest.FixtureRequest, sources: dict[str, SourcePhoto]) -> SourcePhoto:
    return sources[request.param]


def _build(source: SourcePhoto, label_map: np.ndarray | None = None) -> hd.seg.Segmentation:
    if label_map is None:
        _, label_map = synthetic_photo()
    uid = source.dataset.SOPInstanceUID
    return build_segmentation(
        source.dataset,
        label_map,
        algorithm_version=VERSION,
        series_instance_uid=derive_uid(uid, VERSION, UidKind.SEG_SERIES),
        sop_instance_uid=derive_uid(uid, VERSION, UidKind.SEG_INSTANCE),
        content_datetime=WHEN,
    )


def _read(seg: hd.seg.Segmentation) -> hd.seg.Segmentation:
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.seg.segread(buffer)


def test_seg_validates_with_dciodvfy(source: SourcePhoto) -> None:
    assert dciodvfy_errors(_build(source)) == []


def test_seg_reads_back_with_both_segments_coded(source: SourcePhoto) -> None:
    seg = _read(_build(source))
    assert seg.SegmentationType == "BINARY"
    assert seg.get_segment_numbers() == [SEGMENT_SKIN, SEGMENT_LESION]
    skin = seg.get_segment_description(SEGMENT_SKIN)
    lesion = seg.get_segment_description(SEGMENT_LESION)
    assert skin.segment_label == "Skin"
    assert lesion.segment_label == "Lesion"
    assert skin.segmented_property_category == codes.TISSUE
    assert skin.segmented_property_type == codes.SKIN
    assert lesion.segmented_property_category == codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE
    assert lesion.segmented_property_type == codes.LESION
    for description, rgb in ((skin, SKIN_DISPLAY_RGB), (lesion, LESION_DISPLAY_RGB)):
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = description.algorithm_identification
        assert algorithm is not None
        assert algorithm[0].AlgorithmName == "dermpacs"
        assert algorithm[0].AlgorithmVersion == VERSION
        assert algorithm[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        shown = hd.color.CIELabColor.from_dicom_value(description.RecommendedDisplayCIELabValue)
        assert np.abs(np.array(shown.to_rgb()) - np.array(rgb)).max() <= 1


def test_label_map_round_trips_exactly(source: SourcePhoto) -> None:
    _, label_map = synthetic_photo()
    seg = _read(_build(source, label_map))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.dataset.SOPInstanceUID],
        segment_numbers=[SEGMENT_SKIN, SEGMENT_LESION],
    )
    assert pixels.shape == (1, *label_map.shape, 2)
    np.testing.assert_array_equal(pixels[0, ..., 0] != 0, label_map != BACKGROUND)
    np.testing.assert_array_equal(pixels[0, ..., 1] != 0, label_map == LESION)


def test_seg_is_in_source_study_in_new_series_with_source_size(source: SourcePhoto) -> None:
    seg = _build(source)
    assert seg.StudyInstanceUID == source.dataset.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.dataset.SeriesInstanceUID
    assert (seg.Rows, seg.Columns) == (source.dataset.Rows, source.dataset.Columns)
    assert seg.PatientID == source.dataset.get("PatientID", "")
    assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == source.dataset.SOPInstanceUID


def test_seg_carries_viewer_geometry_and_empty_patient_orientation(source: SourcePhoto) -> None:
    seg = roundtrip(_build(source))
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [1.0, 1.0]
    assert float(shared.PixelMeasuresSequence[0].SliceThickness) == 1.0
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in orientation] == [1, 0, 0, 0, 1, 0]
    assert "PatientOrientation" in seg
    assert seg.PatientOrientation in ("", None, [])


def test_seg_names_dermpacs_as_contributing_equipment(source: SourcePhoto) -> None:
    seg = roundtrip(_build(source))
    (equipment,) = [
        item for item in seg.ContributingEquipmentSequence if item.Manufacturer == "dermpacs"
    ]
    purpose = equipment.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    assert purpose.CodeMeaning == dicom_codes.DCM.ProcessingEquipment.meaning
    assert equipment.Manufacturer == "dermpacs"
    assert equipment.SoftwareVersions == VERSION
    assert seg.ContentDate == "20240501"
    assert seg.ContentTime.startswith("123015")


def test_same_photo_and_version_give_same_uids(source: SourcePhoto) -> None:
    first, second = _build(source), _build(source)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    tracking = [item.TrackingUID for item in first.SegmentSequence]
    assert tracking == [item.TrackingUID for item in second.SegmentSequence]
    assert len(set(tracking)) == 2


def test_empty_lesion_still_gives_a_valid_seg_with_both_segments(source: SourcePhoto) -> None:
    _, label_map = synthetic_photo()
    label_map[label_map == LESION] = SKIN
    seg = _build(source, label_map)
    assert dciodvfy_errors(seg) == []
    read = _read(seg)
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.dataset.SOPInstanceUID],
        segment_numbers=[SEGMENT_SKIN, SEGMENT_LESION],
    )
    assert pixels[0, ..., 1].sum() == 0
    assert int(seg.NumberOfFrames) == 2


@pytest.mark.parametrize(
    ("label_map", "message"),
    [
        (np.zeros((10, 10), dtype=np.uint8), "differs from the source"),
        (np.full((96, 128), 3, dtype=np.uint8), "allowed are"),
        (np.zeros((96, 128), dtype=np.float32), "integers"),
        (np.zeros((96, 128, 1), dtype=np.uint8), "2-D"),
    ],
)
def test_bad_label_maps_are_refused(
    sources: dict[str, SourcePhoto], label_map: np.ndarray, message: str
) -> None:
    with pytest.raises(ResultBuildError, match=message):
        _build(sources["vl-photographic"], label_map)


# --- UIDs ------------------------------------------------------------------------------------


def test_derived_uids_are_valid_deterministic_and_distinct() -> None:
    source_uid = "1.2.826.0.1.3680043.8.498.1"
    uids = {
        (kind, item, version): derive_uid(source_uid, version, kind, item=item)
        for kind in UidKind
        for item in ("", "Skin")
        for version in ("0.1.0", "0.2.0")
    }
    for uid in uids.values():
        assert uid.is_valid
        assert uid.startswith("2.25.")
        assert len(uid) <= 64
    # every input change gives a different UID, except the source of the device observer
    assert len(set(uids.values())) == len(uids)
    assert derive_uid(source_uid, "0.1.0", "seg-series") == uids[(UidKind.SEG_SERIES, "", "0.1.0")]
    assert (
        derive_uid("1.2.3", "0.1.0", UidKind.SEG_SERIES) != uids[(UidKind.SEG_SERIES, "", "0.1.0")]
    )
    assert (
        derive_uid("1.2.3", "0.1.0", UidKind.DEVICE_OBSERVER)
        == uids[(UidKind.DEVICE_OBSERVER, "", "0.1.0")]
    )


def test_uid_fields_cannot_run_into_each_other() -> None:
    assert derive_uid("1.2.3", "1|2", UidKind.SR_TRACKING, item="a") != derive_uid(
        "1.2.3", "2", UidKind.SR_TRACKING, item="a|1"
    )


@pytest.mark.parametrize(
    ("source_uid", "version", "kind"),
    [("not a uid", "0.1.0", "seg-series"), ("1.2.3", "", "seg-series"), ("1.2.3", "1", "x")],
)
def test_underivable_uids_are_refused(source_uid: str, version: str, kind: str) -> None:
    with pytest.raises(UidError):
        derive_uid(source_uid, version, kind)


def test_validator_reports_errors_it_finds(sources: dict[str, SourcePhoto]) -> None:
    """dciodvfy is live: the camera-like img2dcm photo lacks Laterality (FIELD-NOTES)."""
    errors = dciodvfy_errors(sources["img2dcm-vlp"].dataset)
    assert any("Laterality" in line for line in errors)
    seg = _build(sources["vl-photographic"])
    del seg.SegmentSequence[0].SegmentLabel
    assert any("SegmentLabel" in line for line in dciodvfy_errors(seg))
