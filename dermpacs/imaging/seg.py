"""DICOM Segmentation of a photograph: segments Skin and Lesion (pure builder, no I/O).

The SEG is a BINARY Segmentation (PS3.3 A.51) of the source photo, built with highdicom, in
the source's study and a new series. Segment 1 "Skin" holds every skin pixel, lesions included
(label values SKIN and LESION: a lesion is skin that is abnormal); segment 2 "Lesion" holds the
LESION pixels. The two segments overlap, which BINARY segmentations allow (PS3.3 C.8.20.2.3).

Two additions make the object open in OHIF (3.13), which otherwise fails on a SEG of an image
without a Frame of Reference (docs/conformance.md, /work/shared/FIELD-NOTES.md):

- a Pixel Measures item (Pixel Spacing, Slice Thickness) and a Plane Orientation item in the
  Shared Functional Groups Sequence (PS3.3 C.7.6.16.2.1, C.7.6.16.2.4). highdicom leaves that
  item empty for such sources and refuses a plane orientation, so they are added afterwards;
- an empty Patient Orientation (Type 2C in the General Image module, required here because the
  SEG has no Image Orientation (Patient)).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

from dermpacs.analysis import BACKGROUND, LESION, SKIN
from dermpacs.imaging import codes
from dermpacs.imaging.derived import (
    SOFTWARE_NAME,
    ResultBuildError,
    contributing_equipment,
    set_content_datetime,
    source_header,
)
from dermpacs.imaging.sopclasses import SECONDARY_CAPTURE_IMAGE
from dermpacs.imaging.uids import UidKind, derive_uid

SEGMENT_SKIN: Final = 1
SEGMENT_LESION: Final = 2

SKIN_DISPLAY_RGB: Final = (0, 170, 255)
"""Display colour of the Skin segment (and of skin outlines in the overlay): sky blue."""
LESION_DISPLAY_RGB: Final = (255, 220, 0)
"""Display colour of the Lesion segment and outlines: yellow, visible on red skin lesions."""

SEG_SERIES_NUMBER: Final = 9101
"""Series Number of dermpacs SEG series; fixed, so that retried jobs write identical headers."""

# Nominal geometry for viewers that need it (OHIF). A photograph has no physical pixel size;
# 1 \ 1 says "one unit per pixel" and matches the source's own spacing when it has one.
_NOMINAL_PIXEL_SPACING: Final = (1.0, 1.0)
_ROW_COLUMN_ORIENTATION: Final = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _check_label_map(source: Dataset, label_map: np.ndarray) -> np.ndarray:
    array = np.asarray(label_map)
    if array.ndim != 2:
        raise ResultBuildError(f"label map must be 2-D (rows, columns), got shape {array.shape}")
    rows, columns = int(source.Rows), int(source.Columns)
    if array.shape != (rows, columns):
        raise ResultBuildError(
            f"label map shape {array.shape} differs from the source's Rows x Columns "
            f"({rows}, {columns})"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ResultBuildError(f"label map must hold integers, got dtype {array.dtype}")
    # The labels are the consecutive integers BACKGROUND..LESION, so a range check suffices;
    # np.unique over a 12-megapixel map would cost tens of milliseconds per photo.
    if array.size and (array.min() < BACKGROUND or array.max() > LESION):
        unknown = np.setdiff1d(np.unique(array), (BACKGROUND, SKIN, LESION))
        raise ResultBuildError(
            f"label map holds values {unknown.tolist()}; allowed are BACKGROUND={BACKGROUND}, "
            f"SKIN={SKIN}, LESION={LESION}"
        )
    return array


def segment_masks(label_map: np.ndarray) -> np.ndarray:
    """Return the binary masks of the two segments, shape ``(rows, columns, 2)``, uint8 0/1.

    Channel 0 is Skin (SKIN or LESION pixels), channel 1 is Lesion (LESION pixels).
    """
    masks = np.empty((2, *label_map.shape), dtype=np.uint8)
    np.not_equal(label_map, BACKGROUND, out=masks[0])
    np.equal(label_map, LESION, out=masks[1])
    # Each segment lies contiguous in memory (a channels-last view of channel-first planes):
    # highdicom reads the masks one segment at a time and sums over segments to find the
    # overlap, both of which run plane by plane instead of over 2-element strides.
    return masks.transpose(1, 2, 0)


def segment_descriptions(
    source_sop_instance_uid: str, algorithm_version: str
) -> list[hd.seg.SegmentDescription]:
    """Return the descriptions of segments Skin and Lesion, with deterministic tracking UIDs."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=SOFTWARE_NAME,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=algorithm_version,
    )
    described = (
        (SEGMENT_SKIN, "Skin", codes.TISSUE, codes.SKIN, SKIN_DISPLAY_RGB),
        (
            SEGMENT_LESION,
            "Lesion",
            codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            codes.LESION,
            LESION_DISPLAY_RGB,
        ),
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=derive_uid(
                source_sop_instance_uid, algorithm_version, UidKind.SEGMENT_TRACKING, item=label
            ),
            tracking_id=label,
            display_color=hd.color.CIELabColor.from_rgb(*rgb),
        )
        for number, label, category, property_type, rgb in described
    ]


def _single_frame_header(source: Dataset) -> Dataset:
    """Return the header highdicom should see for ``source`` (see :func:`source_header`).

    highdicom treats every instance of a multi-frame IOD as an enhanced image with functional
    groups. A Multi-frame True Color Secondary Capture (accepted with one frame) has none, so
    highdicom is shown a single-frame Secondary Capture header with the same UIDs, and the SOP
    class in the SEG's references is put back afterwards (:func:`_restore_source_class`).
    """
    header = source_header(source)
    if "NumberOfFrames" in header and "SharedFunctionalGroupsSequence" not in header:
        for keyword in ("NumberOfFrames", "FrameIncrementPointer"):
            if keyword in header:
                delattr(header, keyword)
        header.SOPClassUID = SECONDARY_CAPTURE_IMAGE
    return header


def _restore_source_class(seg: Dataset, source: Dataset) -> None:
    """Make every reference to ``source`` in ``seg`` carry the source's real SOP Class UID."""

    def fix(dataset: Dataset, element: DataElement) -> None:
        if element.VR == "SQ":
            for item in element.value:
                if item.get("ReferencedSOPInstanceUID") == source.SOPInstanceUID:
                    item.ReferencedSOPClassUID = source.SOPClassUID

    seg.walk(fix)


def _add_viewer_geometry(seg: hd.seg.Segmentation, source: Dataset) -> None:
    """Fill the empty Shared Functional Groups item with Pixel Measures and Plane Orientation."""
    spacing = source.get("PixelSpacing") or _NOMINAL_PIXEL_SPACING
    measures = Dataset()
    measures.PixelSpacing = [float(value) for value in spacing]
    measures.SliceThickness = 1.0
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(_ROW_COLUMN_ORIENTATION)
    if "SharedFunctionalGroupsSequence" not in seg or not seg.SharedFunctionalGroupsSequence:
        seg.SharedFunctionalGroupsSequence = [Dataset()]
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" not in shared:
        shared.PixelMeasuresSequence = [measures]
    if "PlaneOrientationSequence" not in shared:
        shared.PlaneOrientationSequence = [orientation]


def build_segmentation(
    source: Dataset,
    label_map: np.ndarray,
    *,
    algorithm_version: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = SEG_SERIES_NUMBER,
    instance_number: int = 1,
    content_datetime: datetime | None = None,
    device_serial_number: str = "1",
    software_versions: Sequence[str] | None = None,
) -> hd.seg.Segmentation:
    """Build the BINARY SEG of one photo with segments Skin and Lesion.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The source photograph (its header; pixels are not read).
    label_map : numpy.ndarray
        ``(Rows, Columns)`` integer map with values BACKGROUND, SKIN, LESION.
    algorithm_version : str
        Version of the model that made the label map (segment algorithm identification).
    series_instance_uid, sop_instance_uid : str
        UIDs of the new object (see :func:`dermpacs.imaging.uids.derive_uid`).
    series_number, instance_number : int, optional
        Series and instance numbers of the new object.
    content_datetime : datetime.datetime, optional
        The job's time, written as Content Date/Time (and Series Date/Time) so that a retried
        job writes the same values; ``None`` keeps highdicom's creation time.
    device_serial_number : str, optional
        Device Serial Number (Type 1 in the Enhanced General Equipment module).
    software_versions : sequence of str, optional
        Software Versions; defaults to ``[algorithm_version]``.

    Returns
    -------
    highdicom.seg.Segmentation
        The SEG, a :class:`pydicom.dataset.Dataset`.

    Raises
    ------
    ResultBuildError
        When the label map does not match the source or holds unknown values, or the source
        lacks what a SEG needs.
    """
    array = _check_label_map(source, label_map)
    if not algorithm_version:
        raise ResultBuildError("algorithm_version is empty")
    versions = list(software_versions) if software_versions else [algorithm_version]
    try:
        seg = hd.seg.Segmentation(
            source_images=[_single_frame_header(source)],
            pixel_array=segment_masks(array)[np.newaxis],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(source.SOPInstanceUID, algorithm_version),
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=SOFTWARE_NAME,
            manufacturer_model_name=SOFTWARE_NAME,
            software_versions=versions[0] if len(versions) == 1 else tuple(versions),  # type: ignore[arg-type]
            device_serial_number=device_serial_number,
            # Keep one frame per segment even when a segment is empty, so that the object's
            # layout (and frame numbers the SR refers to) never depends on the result.
            omit_empty_frames=False,
            content_description="Skin and lesion segmentation",
            content_label="DERMPACS_SEG",
            series_description="dermpacs skin and lesion segmentation",
            contributing_equipment=[contributing_equipment(versions, content_datetime)],
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ResultBuildError(f"cannot build a SEG for this source: {exc}") from exc
    _restore_source_class(seg, source)
    seg.PatientOrientation = ""
    _add_viewer_geometry(seg, source)
    if content_datetime is not None:
        set_content_datetime(seg, content_datetime)
        seg.SeriesDate = DA(content_datetime.date())
        seg.SeriesTime = TM(content_datetime.time())
    return seg


__all__ = [
    "LESION_DISPLAY_RGB",
    "SEGMENT_LESION",
    "SEGMENT_SKIN",
    "SEG_SERIES_NUMBER",
    "SKIN_DISPLAY_RGB",
    "build_segmentation",
    "segment_descriptions",
    "segment_masks",
]
