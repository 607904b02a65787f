"""TID 1500 SR builder and codes: dciodvfy, dsrdump and highdicom's reader on the result."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import datetime

import highdicom as hd
import numpy as np
import pytest
from dicomcheck import (
    CLASS_NAMES,
    SourcePhoto,
    dciodvfy_errors,
    dsrdump,
    make_analysis,
    make_sources,
    make_vl_photographic,
    roundtrip,
    synthetic_photo,
)
from photos import PHOTO_KINDS, make_photo
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

from dermpacs.analysis import LESION, SKIN, PhotoAnalysis, QualityFlag
from dermpacs.imaging import codes
from dermpacs.imaging.derived import ResultBuildError
from dermpacs.imaging.results import ResultObjects, build_results
from dermpacs.imaging.seg import SEGMENT_LESION, SEGMENT_SKIN
from dermpacs.imaging.sr import (
    TRACKING_CLASSIFIED_REGION,
    TRACKING_LESION,
    TRACKING_SKIN,
    TRACKING_WHOLE_PHOTO,
)

VERSION = "0.1.0"
WHEN = datetime(2024, 5, 1, 12, 30, 15)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SourcePhoto]:
    return {s.kind: s for s in make_sources(tmp_path_factory.mktemp("photos"))}


@pytest.fixture(params=["vl-photographic", "secondary-capture", "img2dcm-vlp"])
def source(request: pytest.FixtureRequest, sources: dict[str, SourcePhoto]) -> SourcePhoto:
    return sources[request.param]


def _results(source: SourcePhoto, analysis: PhotoAnalysis | None = None) -> ResultObjects:
    if analysis is None:
        analysis = make_analysis(synthetic_photo()[1], quality_flags=(QualityFlag.BLUR,))
    return build_results(
        source.dataset,
        source.rgb,
        analysis,
        algorithm_version=VERSION,
        class_names=CLASS_NAMES,
        content_datetime=WHEN,
    )


def _read(dataset: Dataset) -> hd.sr.Comprehensive3DSR:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.srread(buffer)


def _value(group: object, name: Code) -> float:
    (measurement,) = group.get_measurements(name=name)  # type: ignore[attr-defined]
    return float(measurement.value)


def _evaluations(group: object, name: Code) -> list[Code]:
    return [item.value for item in group.get_qualitative_evaluations(name=name)]  # type: ignore[attr-defined]


def test_sr_validates_and_dumps(source: SourcePhoto) -> None:
    sr = _results(source).sr
    assert dciodvfy_errors(sr) == []
    dumped = dsrdump(sr)
    assert dumped.returncode == 0, dumped.stderr
    assert "Imaging Measurement Report" in dumped.stdout
    assert "Atopic dermatitis" in dumped.stdout
    assert sr.CompletionFlag == "PARTIAL"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


def test_sr_reports_every_value_of_the_analysis(source: SourcePhoto) -> None:
    analysis = make_analysis(synthetic_photo()[1], quality_flags=(QualityFlag.BLUR,))
    results = _results(source, analysis)
    report = _read(results.sr).content
    (photo,) = [
        group
        for group in report.get_planar_roi_measurement_groups()
        if group.tracking_identifier == TRACKING_WHOLE_PHOTO
    ]
    assert _value(photo, codes.SKIN_AREA_FRACTION) == pytest.approx(100 * analysis.skin_fraction)
    assert _value(photo, codes.LESION_AREA_FRACTION) == pytest.approx(
        100 * analysis.lesion_fraction
    )
    assert _value(photo, codes.LESION_FRACTION_OF_SKIN) == pytest.approx(
        100 * analysis.lesion_fraction_of_skin
    )
    assert _value(photo, codes.QUALIFYING_CROP_COUNT) == len(analysis.crops) == 2
    assert _value(photo, codes.INDIVIDUAL_TYPOLOGY_ANGLE) == pytest.approx(35.25)
    assert _evaluations(photo, codes.SKIN_TONE_CATEGORY) == [
        codes.SkinToneCategory.INTERMEDIATE.code
    ]
    assert _evaluations(photo, codes.QUALITY_FLAG) == [codes.quality_flag_code(QualityFlag.BLUR)]

    classified = [
        group
        for group in report.get_planar_roi_measurement_groups()
        if group.tracking_identifier == TRACKING_CLASSIFIED_REGION
    ]
    assert len({group.tracking_uid for group in classified}) == 1
    assert len(classified) == 1 + len(CLASS_NAMES)
    summary = [group for group in classified if not group.get_measurements()]
    assert [group.finding_type for group in summary] == [
        codes.DiseaseClass("atopic_dermatitis").code
    ]
    assert _evaluations(summary[0], codes.ATOPIC_DERMATITIS_VS_OTHERS) == [
        codes.DiseaseClass.ATOPIC_DERMATITIS.code
    ]
    assert _evaluations(summary[0], codes.WHOLE_PHOTO_FALLBACK) == [codes.NO]
    probabilities = {
        group.finding_type.value: _value(group, codes.PROBABILITY)
        for group in classified
        if group.get_measurements()
    }
    assert probabilities == {
        codes.disease_code(name).value: pytest.approx(analysis.probabilities[name])
        for name in CLASS_NAMES
    }


def test_sr_regions_are_the_crops_and_the_segments_bounding_boxes(source: SourcePhoto) -> None:
    analysis = make_analysis(synthetic_photo()[1])
    report = _read(_results(source, analysis).sr).content
    crops = report.get_planar_roi_measurement_groups(finding_type=codes.QUALIFYING_CROP)
    assert len(crops) == len(analysis.crops)
    for group, crop in zip(crops, analysis.crops, strict=True):
        row0, col0, row1, col1 = crop.box
        np.testing.assert_array_equal(
            group.roi.value,
            [[col0, row0], [col1, row0], [col1, row1], [col0, row1], [col0, row0]],
        )
        (image,) = group.roi.ContentSequence
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            source.dataset.SOPInstanceUID
        )
        assert _value(group, codes.SKIN_AREA_FRACTION) == pytest.approx(100 * crop.skin_fraction)
        assert _value(group, codes.LESION_AREA_FRACTION) == pytest.approx(
            100 * crop.lesion_fraction
        )
    label_map = analysis.label_map
    (lesion,) = report.get_planar_roi_measurement_groups(finding_type=codes.LESION)
    rows, columns = np.nonzero(label_map == LESION)
    points = lesion.roi.value
    assert points[:, 0].min() == columns.min() and points[:, 0].max() == columns.max() + 1
    assert points[:, 1].min() == rows.min() and points[:, 1].max() == rows.max() + 1


def test_sr_references_the_seg_segments(source: SourcePhoto) -> None:
    results = _results(source)
    report = _read(results.sr).content
    groups = report.get_volumetric_roi_measurement_groups()
    referenced = {group.tracking_identifier: group.referenced_segment for group in groups}
    assert set(referenced) == {TRACKING_SKIN, TRACKING_LESION}
    for identifier, number in ((TRACKING_SKIN, SEGMENT_SKIN), (TRACKING_LESION, SEGMENT_LESION)):
        segment = referenced[identifier]
        assert segment.referenced_sop_instance_uid == results.seg.SOPInstanceUID
        assert segment.referenced_sop_class_uid == results.seg.SOPClassUID
        assert segment.referenced_segment_numbers == [number]
        (image,) = segment.source_images_for_segmentation
        assert image.referenced_sop_instance_uid == source.dataset.SOPInstanceUID
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in results.sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {source.dataset.SOPInstanceUID, results.seg.SOPInstanceUID}


def test_every_tracked_region_has_image_coordinates_on_the_source(source: SourcePhoto) -> None:
    """OHIF 3.13 fails on TID 1500 groups without image coordinates (FIELD-NOTES)."""
    results = _results(source)
    container = results.sr.ContentSequence
    (measurements,) = [
        item for item in container if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    by_uid: dict[str, list[Dataset]] = {}
    for group in measurements.ContentSequence:
        (uid,) = [
            item.UID
            for item in group.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "112040"
        ]
        by_uid.setdefault(uid, []).extend(group.ContentSequence)
    assert len(by_uid) == 6  # whole photo, classified region, skin, lesion, two crops
    for items in by_uid.values():
        regions = [item for item in items if item.ValueType == "SCOORD"]
        assert regions
        for region in regions:
            image = region.ContentSequence[0].ReferencedSOPSequence[0]
            assert image.ReferencedSOPInstanceUID == source.dataset.SOPInstanceUID
            assert region.GraphicType == "POLYLINE"
        assert any(item.ConceptNameCodeSequence[0].CodeValue == "112039" for item in items)


def test_whole_photo_fallback_without_crops_or_lesion(source: SourcePhoto) -> None:
    _, label_map = synthetic_photo()
    label_map[label_map == LESION] = SKIN
    analysis = make_analysis(
        label_map,
        finding="impetigo",
        crops=(),
        whole_image_fallback=True,
        quality_flags=(QualityFlag.NO_QUALIFYING_CROP,),
        ita_degrees=None,
        ita_category=None,
    )
    results = _results(source, analysis)
    assert dciodvfy_errors(results.sr) == []
    report = _read(results.sr).content
    assert report.get_planar_roi_measurement_groups(finding_type=codes.LESION) == []
    assert len(report.get_volumetric_roi_measurement_groups()) == 1
    (summary,) = [
        group
        for group in report.get_planar_roi_measurement_groups(
            finding_type=codes.disease_code("impetigo")
        )
        if not group.get_measurements()
    ]
    assert _evaluations(summary, codes.ATOPIC_DERMATITIS_VS_OTHERS) == [codes.NOT_ATOPIC_DERMATITIS]
    assert _evaluations(summary, codes.WHOLE_PHOTO_FALLBACK) == [codes.YES]
    rows, columns = label_map.shape
    np.testing.assert_array_equal(
        summary.roi.value, [[0, 0], [columns, 0], [columns, rows], [0, rows], [0, 0]]
    )


def test_all_objects_share_the_study_get_new_series_and_stable_uids(source: SourcePhoto) -> None:
    first, second = _results(source), _results(source)
    series = set()
    for name, dataset in first.as_dict().items():
        again = second.as_dict()[name]
        assert dataset.StudyInstanceUID == source.dataset.StudyInstanceUID
        assert dataset.SeriesInstanceUID != source.dataset.SeriesInstanceUID
        assert (dataset.SOPInstanceUID, dataset.SeriesInstanceUID) == (
            again.SOPInstanceUID,
            again.SeriesInstanceUID,
        )
        series.add(dataset.SeriesInstanceUID)
        equipment = [
            item
            for item in dataset.ContributingEquipmentSequence
            if item.Manufacturer == "dermpacs"
        ]
        assert equipment and equipment[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert len(series) == 3
    other = build_results(
        source.dataset,
        source.rgb,
        make_analysis(synthetic_photo()[1], model_version="0.2.0"),
        algorithm_version="0.2.0",
        class_names=CLASS_NAMES,
    )
    assert other.sr.SOPInstanceUID != first.sr.SOPInstanceUID
    assert other.seg.SeriesInstanceUID != first.seg.SeriesInstanceUID


def test_private_scheme_is_declared(source: SourcePhoto) -> None:
    sr = _results(source).sr
    schemes = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert codes.DERMPACS_SCHEME in schemes


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"probabilities": {"atopic_dermatitis": 1.0}}, ResultBuildError, "configured classes"),
        ({"finding": "psoriasis"}, ResultBuildError, "not a configured class"),
        ({"skin_fraction": 1.5}, ResultBuildError, "between 0 and 1"),
        ({"ita_category": "olive"}, codes.UnknownCodeError, "ITA category"),
        ({"label_map": np.zeros((4, 4), np.uint8)}, ResultBuildError, "differs"),
        ({"model_version": "9.9"}, ResultBuildError, "from model"),
    ],
)
def test_inconsistent_analyses_are_refused(
    sources: dict[str, SourcePhoto], change: dict[str, object], error: type, message: str
) -> None:
    analysis = replace(make_analysis(synthetic_photo()[1]), **change)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        _results(sources["vl-photographic"], analysis)


def test_crop_outside_the_photo_is_refused(sources: dict[str, SourcePhoto]) -> None:
    analysis = make_analysis(synthetic_photo()[1], crops=((0, 0, 500, 20),))
    with pytest.raises(ResultBuildError, match="outside"):
        _results(sources["vl-photographic"], analysis)


# --- codes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "pydicoms"),
    [
        (codes.TISSUE, dicom_codes.SCT.Tissue),
        (codes.SKIN, dicom_codes.SCT.Skin),
        (
            codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            dicom_codes.SCT.MorphologicallyAbnormalStructure,
        ),
        (codes.LESION, dicom_codes.SCT.Lesion),
        (codes.DiseaseClass.ATOPIC_DERMATITIS.code, dicom_codes.SCT.AtopicDermatitis),
        (codes.ARTIFICIAL_INTELLIGENCE, dicom_codes.DCM.ArtificialIntelligence),
        (codes.PROCESSING_EQUIPMENT, dicom_codes.DCM.ProcessingEquipment),
        (codes.PHOTOGRAPHY_OF_PATIENT, dicom_codes.SCT.PhotographyOfPatient),
        (codes.PROBABILITY, dicom_codes.DCM.Probability),
        (codes.YES, dicom_codes.SCT.Yes),
        (codes.NO, dicom_codes.SCT.No),
        (codes.UNIT_NONE, dicom_codes.UCUM.NoUnits),
        (codes.UNIT_PERCENT, dicom_codes.UCUM.Percent),
        (codes.UNIT_DEGREE, dicom_codes.UCUM.Degree),
    ],
)
def test_standard_codes_match_pydicoms_tables(ours: Code, pydicoms: Code) -> None:
    assert (ours.value, ours.scheme_designator) == (pydicoms.value, pydicoms.scheme_designator)
    assert ours.meaning.lower() == pydicoms.meaning.lower()


def test_segment_codes_are_in_the_segmentation_context_groups() -> None:
    from pydicom.sr._cid_dict import cid_concepts

    assert {"Tissue", "MorphologicallyAbnormalStructure"} <= set(cid_concepts[7150]["SCT"])
    assert {"Skin", "Lesion"} <= set(cid_concepts[7151]["SCT"])


def test_every_configured_class_and_category_has_a_code() -> None:
    assert codes.check_class_names(CLASS_NAMES) == tuple(codes.DiseaseClass)
    assert len({member.code for member in codes.DiseaseClass}) == len(codes.DiseaseClass)
    for category in codes.SkinToneCategory:
        assert len(category.code.value) <= 16  # SH
        assert codes.skin_tone_category(category.value.replace(" ", "_")) is category
    for flag in QualityFlag:
        assert codes.quality_flag_code(flag).scheme_designator == codes.DERMPACS_SCHEME
    with pytest.raises(codes.UnknownCodeError):
        codes.check_class_names(["atopic_dermatitis", "atopic_dermatitis"])
    with pytest.raises(codes.UnknownCodeError):
        codes.disease_code("eczema")


def test_photo_without_skin_gives_valid_objects(sources: dict[str, SourcePhoto]) -> None:
    source = sources["img2dcm-vlp"]
    label_map = np.zeros((int(source.dataset.Rows), int(source.dataset.Columns)), np.int64)
    analysis = make_analysis(
        label_map,
        finding="mycosis_fungoides",
        crops=(),
        whole_image_fallback=True,
        quality_flags=(QualityFlag.TOO_LITTLE_SKIN, QualityFlag.NO_QUALIFYING_CROP),
        ita_degrees=None,
        ita_category=None,
    )
    results = _results(source, analysis)
    for dataset in results.as_dict().values():
        assert dciodvfy_errors(dataset) == []
    report = _read(results.sr).content
    assert report.get_volumetric_roi_measurement_groups() == []
    (photo,) = [
        group
        for group in report.get_planar_roi_measurement_groups()
        if group.tracking_identifier == TRACKING_WHOLE_PHOTO
    ]
    assert _value(photo, codes.SKIN_AREA_FRACTION) == 0
    assert set(_evaluations(photo, codes.QUALITY_FLAG)) == {
        codes.quality_flag_code(QualityFlag.TOO_LITTLE_SKIN),
        codes.quality_flag_code(QualityFlag.NO_QUALIFYING_CROP),
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", [kind.name for kind in PHOTO_KINDS])
def test_results_for_every_accepted_photo_kind_validate(kind: str) -> None:
    """SEG, SR and overlay of every SOP class and encoding the decoder accepts validate."""
    dataset, rgb = make_photo(kind, rows=48, columns=64)
    analysis = make_analysis(synthetic_photo(48, 64)[1])
    results = build_results(
        dataset, rgb, analysis, algorithm_version=VERSION, class_names=CLASS_NAMES
    )
    for name, output in results.as_dict().items():
        assert dciodvfy_errors(output) == [], name
        assert output.StudyInstanceUID == dataset.StudyInstanceUID
    assert (results.seg.Rows, results.seg.Columns) == (48, 64)
    references = [
        item
        for item in results.seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        if item.ReferencedSOPInstanceUID == dataset.SOPInstanceUID
    ]
    assert references and references[0].ReferencedSOPClassUID == dataset.SOPClassUID


@pytest.mark.parametrize(
    ("character_set", "patient_name"),
    [
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),  # as Japanese systems write it
        ("ISO_IR 192", "山田^太郎"),
        ("ISO_IR 100", "Müller^Jörg"),
    ],
)
def test_patient_names_keep_their_characters(
    character_set: str | list[str], patient_name: str
) -> None:
    rgb, label_map = synthetic_photo()
    photo = make_vl_photographic(rgb)
    photo.SpecificCharacterSet = character_set
    photo.PatientName = patient_name
    photo = roundtrip(photo)
    results = build_results(
        photo, rgb, make_analysis(label_map), algorithm_version=VERSION, class_names=CLASS_NAMES
    )
    for name, output in results.as_dict().items():
        assert str(roundtrip(output).PatientName) == patient_name, name
        assert dciodvfy_errors(output) == [], name
