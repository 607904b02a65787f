"""TID 1500 Measurement Report of one photo's results (pure builder, no I/O).

A Comprehensive 3D SR (PS3.3 A.35.13) whose content is highdicom's ``MeasurementReport``
(PS3.16 TID 1500), Completion Flag PARTIAL and Verification Flag UNVERIFIED: nobody has
checked the result. Encoding (docs/conformance.md has the full tree):

Every measurement group carries an image region (an SCOORD POLYLINE on the source photo) and a
tracking identifier, because OHIF 3.13 fails on TID 1500 groups without image coordinates.
Groups that describe the same region share one Tracking Unique Identifier, so a viewer that
merges groups by that UID (OHIF does) shows one outlined region with all its values.

- "Whole photograph" (TID 1410 Planar ROI, region = the photo's border): skin, lesion and
  lesion-of-skin area fractions, number of qualifying crops, ITA and its category, quality flags.
- "Classified region" (TID 1410, region = bounding box of the qualifying crops, or the whole
  photo when the method fell back to it): one group with Finding = the top finding, atopic
  dermatitis vs others and the whole-photo fallback flag; one group per class with
  Finding = the class and its Probability.
- "Skin" and "Lesion": a TID 1410 group with the segment's bounding box and a TID 1411
  Volumetric ROI group that references the SEG segment (Referenced Segment with the source
  image); both share the tracking UID. The Planar alternative for a segment reference
  (Referenced Segmentation Frame) makes dciodvfy report an error, the Volumetric one does not.
  An empty segment gets no groups.
- "Crop n" (TID 1410, region = the crop's box): the crop's skin and lesion area fractions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Final

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

from dermpacs.analysis import PhotoAnalysis
from dermpacs.imaging import codes
from dermpacs.imaging.derived import (
    SOFTWARE_NAME,
    ResultBuildError,
    contributing_equipment,
    set_content_datetime,
    source_header,
)
from dermpacs.imaging.seg import SEGMENT_LESION, SEGMENT_SKIN, segment_masks
from dermpacs.imaging.uids import UidKind, derive_uid

SR_SERIES_NUMBER: Final = 9102
"""Series Number of dermpacs SR series; fixed, so that retried jobs write identical headers."""

TRACKING_WHOLE_PHOTO: Final = "Whole photograph"
TRACKING_CLASSIFIED_REGION: Final = "Classified region"
TRACKING_SKIN: Final = "Skin"
TRACKING_LESION: Final = "Lesion"


def _crop_tracking(index: int) -> str:
    return f"Crop {index}"


Box = tuple[int, int, int, int]
"""``(row0, col0, row1, col1)`` in source pixels, exclusive ends (as in ``Crop.box``)."""


def _box_polyline(box: Box) -> np.ndarray:
    """Closed POLYLINE around ``box`` in SCOORD image coordinates (column, row).

    PS3.3 C.18.6.1.1: (0, 0) is the top left corner of the top left pixel, so the outer edges
    of pixels ``row0..row1-1`` and ``col0..col1-1`` lie at exactly row0, row1, col0, col1.
    """
    row0, col0, row1, col1 = box
    return np.array(
        [[col0, row0], [col1, row0], [col1, row1], [col0, row1], [col0, row0]], dtype=float
    )


def mask_bounding_box(mask: np.ndarray) -> Box | None:
    """Return the bounding box of the true pixels of ``mask``, or ``None`` when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    columns = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(columns[0]), int(rows[-1]) + 1, int(columns[-1]) + 1


def classified_region(analysis: PhotoAnalysis, rows: int, columns: int) -> Box:
    """Return the region the classification came from: the crops' bounding box or the photo."""
    if analysis.whole_image_fallback or not analysis.crops:
        return 0, 0, rows, columns
    boxes = np.array([crop.box for crop in analysis.crops])
    return (
        int(boxes[:, 0].min()),
        int(boxes[:, 1].min()),
        int(boxes[:, 2].max()),
        int(boxes[:, 3].max()),
    )


def _check_fraction(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ResultBuildError(f"{name} must be a number between 0 and 1, got {value!r}")
    return float(value)


def _check_analysis(
    analysis: PhotoAnalysis, class_names: Sequence[str], rows: int, columns: int
) -> None:
    label_map = np.asarray(analysis.label_map)
    if label_map.shape != (rows, columns):
        raise ResultBuildError(
            f"label map shape {label_map.shape} differs from the source's Rows x Columns "
            f"({rows}, {columns})"
        )
    if set(analysis.probabilities) != set(class_names):
        raise ResultBuildError(
            f"probabilities are for {sorted(analysis.probabilities)}, "
            f"the configured classes are {list(class_names)}"
        )
    for name, value in analysis.probabilities.items():
        _check_fraction(f"probability of {name}", value)
    if analysis.finding not in class_names:
        raise ResultBuildError(f"finding {analysis.finding!r} is not a configured class")
    _check_fraction("atopic_dermatitis_probability", analysis.atopic_dermatitis_probability)
    for name in ("skin_fraction", "lesion_fraction", "lesion_fraction_of_skin"):
        _check_fraction(name, getattr(analysis, name))
    for index, crop in enumerate(analysis.crops, start=1):
        row0, col0, row1, col1 = crop.box
        if not (0 <= row0 < row1 <= rows and 0 <= col0 < col1 <= columns):
            raise ResultBuildError(
                f"crop {index} box {crop.box} is empty or outside the {rows}x{columns} photo"
            )
        _check_fraction(f"crop {index} skin_fraction", crop.skin_fraction)
        _check_fraction(f"crop {index} lesion_fraction", crop.lesion_fraction)
    if analysis.ita_degrees is not None and not math.isfinite(analysis.ita_degrees):
        raise ResultBuildError(f"ita_degrees must be finite, got {analysis.ita_degrees!r}")


def _percent(name: Code, fraction: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=100.0 * fraction, unit=codes.UNIT_PERCENT)


class _ReportContext:
    """What every group of one report shares: the source image, tracking UIDs, algorithm."""

    def __init__(self, source: Dataset, algorithm_version: str) -> None:
        self.source = source
        self.algorithm_version = algorithm_version
        self.algorithm = hd.sr.AlgorithmIdentification(
            name=SOFTWARE_NAME, version=algorithm_version, family=codes.ARTIFICIAL_INTELLIGENCE
        )
        # No Referenced Frame Number, also for a one-frame Multi-frame True Color SC: the
        # reference applies to all frames (PS3.3 C.17.3.2.1), and dciodvfy rejects one there.
        self.source_image = hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        )

    def tracking(self, identifier: str) -> hd.sr.TrackingIdentifier:
        uid = derive_uid(
            self.source.SOPInstanceUID,
            self.algorithm_version,
            UidKind.SR_TRACKING,
            item=identifier,
        )
        return hd.sr.TrackingIdentifier(uid=uid, identifier=identifier)

    def region(self, box: Box) -> hd.sr.ImageRegion:
        return hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=_box_polyline(box),
            source_image=self.source_image,
        )

    def planar(
        self,
        identifier: str,
        box: Box,
        *,
        finding_type: Code | None = None,
        finding_category: Code | None = None,
        measurements: Sequence[hd.sr.Measurement] = (),
        evaluations: Sequence[hd.sr.QualitativeEvaluation] = (),
    ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=self.tracking(identifier),
            referenced_region=self.region(box),
            finding_type=finding_type,
            finding_category=finding_category,
            algorithm_id=self.algorithm,
            measurements=list(measurements) or None,
            qualitative_evaluations=list(evaluations) or None,
        )

    def segment(
        self,
        identifier: str,
        seg_dataset: Dataset,
        segment_number: int,
        finding_type: Code,
        finding_category: Code,
    ) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=seg_dataset.SOPClassUID,
            sop_instance_uid=seg_dataset.SOPInstanceUID,
            segment_number=segment_number,
            source_images=[
                hd.sr.SourceImageForSegmentation(
                    referenced_sop_class_uid=self.source.SOPClassUID,
                    referenced_sop_instance_uid=self.source.SOPInstanceUID,
                )
            ],
        )
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=self.tracking(identifier),
            referenced_segment=referenced,
            finding_type=finding_type,
            finding_category=finding_category,
            algorithm_id=self.algorithm,
        )


def _measurement_groups(
    context: _ReportContext,
    analysis: PhotoAnalysis,
    seg_dataset: Dataset,
    class_names: Sequence[str],
    rows: int,
    columns: int,
) -> list[
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
]:
    classes = codes.check_class_names(class_names)
    top = codes.disease_class(analysis.finding)
    whole: Box = (0, 0, rows, columns)

    photo_measurements = [
        _percent(codes.SKIN_AREA_FRACTION, analysis.skin_fraction),
        _percent(codes.LESION_AREA_FRACTION, analysis.lesion_fraction),
        _percent(codes.LESION_FRACTION_OF_SKIN, analysis.lesion_fraction_of_skin),
        hd.sr.Measurement(
            name=codes.QUALIFYING_CROP_COUNT, value=len(analysis.crops), unit=codes.UNIT_NONE
        ),
    ]
    if analysis.ita_degrees is not None:
        photo_measurements.append(
            hd.sr.Measurement(
                name=codes.INDIVIDUAL_TYPOLOGY_ANGLE,
                value=float(analysis.ita_degrees),
                unit=codes.UNIT_DEGREE,
            )
        )
    photo_evaluations = []
    if analysis.ita_category is not None:
        category = codes.skin_tone_category(analysis.ita_category)
        photo_evaluations.append(
            hd.sr.QualitativeEvaluation(name=codes.SKIN_TONE_CATEGORY, value=category.code)
        )
    for flag in analysis.quality_flags:
        photo_evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=codes.QUALITY_FLAG, value=codes.quality_flag_code(flag)
            )
        )
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = [
        context.planar(
            TRACKING_WHOLE_PHOTO,
            whole,
            measurements=photo_measurements,
            evaluations=photo_evaluations,
        )
    ]

    region = classified_region(analysis, rows, columns)
    versus_others = (
        codes.DiseaseClass.ATOPIC_DERMATITIS.code
        if analysis.is_atopic_dermatitis
        else codes.NOT_ATOPIC_DERMATITIS
    )
    groups.append(
        context.planar(
            TRACKING_CLASSIFIED_REGION,
            region,
            finding_type=top.code,
            evaluations=[
                hd.sr.QualitativeEvaluation(
                    name=codes.ATOPIC_DERMATITIS_VS_OTHERS, value=versus_others
                ),
                hd.sr.QualitativeEvaluation(
                    name=codes.WHOLE_PHOTO_FALLBACK,
                    value=codes.YES if analysis.whole_image_fallback else codes.NO,
                ),
            ],
        )
    )
    for disease in classes:
        groups.append(
            context.planar(
                TRACKING_CLASSIFIED_REGION,
                region,
                finding_type=disease.code,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.PROBABILITY,
                        value=float(analysis.probabilities[disease.value]),
                        unit=codes.UNIT_NONE,
                    )
                ],
            )
        )

    masks = segment_masks(np.asarray(analysis.label_map))
    described = (
        (TRACKING_SKIN, SEGMENT_SKIN, codes.SKIN, codes.TISSUE),
        (TRACKING_LESION, SEGMENT_LESION, codes.LESION, codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE),
    )
    for identifier, number, finding_type, finding_category in described:
        box = mask_bounding_box(masks[..., number - 1])
        if box is None:
            continue
        groups.append(
            context.planar(
                identifier, box, finding_type=finding_type, finding_category=finding_category
            )
        )
        groups.append(
            context.segment(identifier, seg_dataset, number, finding_type, finding_category)
        )

    for index, crop in enumerate(analysis.crops, start=1):
        groups.append(
            context.planar(
                _crop_tracking(index),
                crop.box,
                finding_type=codes.QUALIFYING_CROP,
                measurements=[
                    _percent(codes.SKIN_AREA_FRACTION, crop.skin_fraction),
                    _percent(codes.LESION_AREA_FRACTION, crop.lesion_fraction),
                ],
            )
        )
    return groups


def _observation_context(algorithm_version: str) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid("", algorithm_version, UidKind.DEVICE_OBSERVER),
        name=SOFTWARE_NAME,
        manufacturer_name=SOFTWARE_NAME,
        model_name=f"{SOFTWARE_NAME} {algorithm_version}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=dicom_codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def build_report(
    source: Dataset,
    analysis: PhotoAnalysis,
    *,
    seg_dataset: Dataset,
    class_names: Sequence[str],
    algorithm_version: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = SR_SERIES_NUMBER,
    instance_number: int = 1,
    content_datetime: datetime | None = None,
    software_versions: Sequence[str] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Measurement Report of one photo's results.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The source photograph.
    analysis : dermpacs.analysis.PhotoAnalysis
        What the method found in it.
    seg_dataset : pydicom.dataset.Dataset
        The SEG built from the same analysis (:func:`dermpacs.imaging.seg.build_segmentation`),
        whose segments the report references.
    class_names : sequence of str
        The configured classes, in order (``ModelSettings.classes``).
    algorithm_version : str
        Version of the model that produced ``analysis``.
    series_instance_uid, sop_instance_uid : str
        UIDs of the new object.
    series_number, instance_number : int, optional
        Series and instance numbers of the new object.
    content_datetime : datetime.datetime, optional
        The job's time, written as Content Date/Time; ``None`` keeps highdicom's creation time.
    software_versions : sequence of str, optional
        Software Versions of the contributing equipment; defaults to ``[algorithm_version]``.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR, a :class:`pydicom.dataset.Dataset`.

    Raises
    ------
    ResultBuildError
        When the analysis is inconsistent with the source, the classes or itself.
    dermpacs.imaging.codes.UnknownCodeError
        When a class name or ITA category has no code.
    """
    rows, columns = int(source.Rows), int(source.Columns)
    if not algorithm_version:
        raise ResultBuildError("algorithm_version is empty")
    if seg_dataset.StudyInstanceUID != source.StudyInstanceUID:
        raise ResultBuildError("the SEG is not in the source's study")
    _check_analysis(analysis, class_names, rows, columns)
    context = _ReportContext(source, algorithm_version)
    groups = _measurement_groups(context, analysis, seg_dataset, class_names, rows, columns)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm_version),
        procedure_reported=codes.PHOTOGRAPHY_OF_PATIENT,
        imaging_measurements=groups,
    )
    versions = list(software_versions) if software_versions else [algorithm_version]
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=[source_header(source), seg_dataset],
            content=report,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=SOFTWARE_NAME,
            is_complete=False,
            is_final=False,
            is_verified=False,
            series_description="dermpacs skin disease measurement report",
            contributing_equipment=[contributing_equipment(versions, content_datetime)],
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ResultBuildError(f"cannot build the SR for this source: {exc}") from exc
    sr.CodingSchemeIdentificationSequence = [
        *sr.get("CodingSchemeIdentificationSequence", []),
        codes.coding_scheme_identification(),
    ]
    if content_datetime is not None:
        set_content_datetime(sr, content_datetime)
    return sr


__all__ = [
    "SR_SERIES_NUMBER",
    "TRACKING_CLASSIFIED_REGION",
    "TRACKING_LESION",
    "TRACKING_SKIN",
    "TRACKING_WHOLE_PHOTO",
    "build_report",
    "classified_region",
    "mask_bounding_box",
]
