"""Secondary Capture of the photo with the result burned in (pure builder, no I/O).

For viewers that show no SEG or SR: the photo with skin and lesion outlines (the SEG's display
colours), the qualifying crops' boxes and a legend (finding, probability, atopic dermatitis vs
others, "NOT FOR CLINICAL USE"), drawn with pillow. Burned In Annotation is YES (PS3.3
C.7.6.1.1.4). The image goes into the source's study, in a new series.

A review image, not a diagnostic one: photos larger than ``max_long_side`` are scaled down
(by a whole factor, averaging blocks) before drawing, so that a 24-megapixel photo does not
become a 72 MB uncompressed object on the PACS.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.uid import UID
from pydicom.valuerep import DA, TM
from scipy import ndimage

from dermpacs.analysis import LESION, PhotoAnalysis
from dermpacs.imaging import codes
from dermpacs.imaging.derived import (
    SOFTWARE_NAME,
    ResultBuildError,
    contributing_equipment,
    set_content_datetime,
    source_header,
)
from dermpacs.imaging.seg import LESION_DISPLAY_RGB, SKIN_DISPLAY_RGB
from dermpacs.imaging.sopclasses import LOSSY_TRANSFER_SYNTAXES

OVERLAY_SERIES_NUMBER: Final = 9103
"""Series Number of dermpacs overlay series; fixed, so that retried jobs write identical headers."""

DEFAULT_MAX_LONG_SIDE: Final = 2048
CROP_BOX_RGB: Final = (255, 255, 255)
NOT_FOR_CLINICAL_USE: Final = "NOT FOR CLINICAL USE"
_MIN_FONT_SIZE: Final = 8
_LEGEND_BACKGROUND_ALPHA: Final = 0.6


def _scaled(
    rgb: np.ndarray, label_map: np.ndarray, max_long_side: int | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """The photo and its labels reduced by the smallest whole factor that brings the long side
    to ``max_long_side`` or below.

    A whole factor lets pillow's box reduction (each output pixel the mean of a block, which is
    what a resampling filter converges to at that factor) and plain subsampling of the labels do
    the work: about ten times cheaper than Lanczos to exactly ``max_long_side`` on a
    12-megapixel photo (4000 x 3000 becomes 2000 x 1500), and the outlines stay on pixel edges.
    """
    rows, columns = label_map.shape
    long_side = max(rows, columns)
    if max_long_side is None or long_side <= max_long_side:
        return rgb, label_map, 1.0
    factor = -(-long_side // max_long_side)
    image = Image.fromarray(rgb).reduce(factor)
    # Label of each block's top left pixel, the same grid as the reduced photo (whose size is
    # rounded up for a partial last block).
    labels = np.ascontiguousarray(label_map[::factor, ::factor], dtype=np.uint8)
    return np.asarray(image), labels, 1.0 / factor


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its edge (the image border counts)."""
    if not mask.any():
        return mask
    # Erosion by a (2 width + 1) square as a separable minimum filter: one pass per axis
    # whatever the width, where iterated binary erosion makes ``width`` passes.
    eroded = ndimage.minimum_filter(
        mask.view(np.uint8), size=2 * width + 1, mode="constant", cval=0
    ).view(bool)
    return mask & ~eroded


def _legend_lines(analysis: PhotoAnalysis, algorithm_version: str) -> list[str]:
    top = codes.disease_class(analysis.finding)
    probability = analysis.probabilities.get(analysis.finding, float("nan"))
    versus = "atopic dermatitis" if analysis.is_atopic_dermatitis else "other than AD"
    if analysis.whole_image_fallback or not analysis.crops:
        basis = "from the whole photo (no qualifying crop)"
    else:
        basis = f"from {len(analysis.crops)} crop(s)"
    # The warning comes first and the long version string last, so that a narrow photo
    # never loses the warning to the edge.
    lines = [
        NOT_FOR_CLINICAL_USE,
        f"Finding: {top.label} ({probability:.0%}) {basis}",
        f"AD vs others: {versus} (AD {analysis.atopic_dermatitis_probability:.0%})",
    ]
    if analysis.quality_flags:
        flags = ", ".join(flag.value.replace("_", " ") for flag in analysis.quality_flags)
        lines.append(f"Check: {flags}")
    lines.append(f"{SOFTWARE_NAME} {algorithm_version}")
    return lines


def _draw_legend(image: Image.Image, lines: Sequence[str]) -> None:
    draw = ImageDraw.Draw(image)
    # Start at 1/50 of the long side and shrink until the longest line fits the width.
    font_size = max(_MIN_FONT_SIZE, round(max(image.size) / 50))
    while True:
        font = ImageFont.load_default(size=font_size)
        padding = max(3, font_size // 3)
        text_width = max(draw.textlength(line, font=font) for line in lines)
        if text_width + 2 * padding <= image.width or font_size <= _MIN_FONT_SIZE:
            break
        font_size -= 1
    line_height = round(font_size * 1.25)
    key = [("skin", SKIN_DISPLAY_RGB), ("lesion", LESION_DISPLAY_RGB), ("crop", CROP_BOX_RGB)]
    key_width = sum(line_height + draw.textlength(name, font=font) + padding for name, _ in key)
    width = round(max(text_width, key_width)) + 2 * padding
    height = line_height * (len(lines) + 1) + 2 * padding
    width, height = min(width, image.width), min(height, image.height)
    # A darkened panel keeps the text readable on any photo.
    panel = image.crop((0, 0, width, height))
    image.paste(Image.blend(panel, Image.new("RGB", panel.size), _LEGEND_BACKGROUND_ALPHA))
    y = padding
    for line in lines:
        draw.text((padding, y), line, fill=(255, 255, 255), font=font)
        y += line_height
    x = padding
    swatch = max(4, line_height - padding)
    for name, colour in key:
        draw.rectangle((x, y + 1, x + swatch, y + 1 + swatch), outline=colour, width=2)
        x += swatch + padding
        draw.text((x, y), name, fill=(255, 255, 255), font=font)
        x += round(draw.textlength(name, font=font)) + 2 * padding


def render_overlay(
    rgb: np.ndarray,
    analysis: PhotoAnalysis,
    *,
    algorithm_version: str,
    max_long_side: int | None = DEFAULT_MAX_LONG_SIDE,
) -> np.ndarray:
    """Return the RGB image with outlines, crop boxes and legend burned in.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(rows, columns, 3)`` uint8 photo.
    analysis : dermpacs.analysis.PhotoAnalysis
        The result to draw; its label map has the photo's shape.
    algorithm_version : str
        Shown in the legend.
    max_long_side : int or None, optional
        Larger photos are scaled down to this long side before drawing; ``None`` keeps the size.

    Returns
    -------
    numpy.ndarray
        ``(rows', columns', 3)`` uint8.
    """
    label_map = np.asarray(analysis.label_map)
    photo, labels, scale = _scaled(np.asarray(rgb), label_map, max_long_side)
    width = max(1, round(max(labels.shape) / 400))
    out = photo.copy()
    out[_outline(labels != 0, width)] = SKIN_DISPLAY_RGB
    out[_outline(labels == LESION, width)] = LESION_DISPLAY_RGB
    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    for crop in analysis.crops:
        row0, col0, row1, col1 = (round(value * scale) for value in crop.box)
        draw.rectangle((col0, row0, col1 - 1, row1 - 1), outline=CROP_BOX_RGB, width=width)
    _draw_legend(image, _legend_lines(analysis, algorithm_version))
    return np.asarray(image)


def _check_inputs(source: Dataset, rgb: np.ndarray, analysis: PhotoAnalysis) -> None:
    rows, columns = int(source.Rows), int(source.Columns)
    if rgb.shape != (rows, columns, 3) or rgb.dtype != np.uint8:
        raise ResultBuildError(
            f"photo must be uint8 of shape ({rows}, {columns}, 3) like the source, "
            f"got {rgb.dtype} {rgb.shape}"
        )
    if np.asarray(analysis.label_map).shape != (rows, columns):
        raise ResultBuildError(
            f"label map shape {np.asarray(analysis.label_map).shape} differs from the source's "
            f"Rows x Columns ({rows}, {columns})"
        )


def _source_was_lossy(source: Dataset) -> bool:
    syntax = UID(getattr(getattr(source, "file_meta", Dataset()), "TransferSyntaxUID", ""))
    return source.get("LossyImageCompression") == "01" or syntax in LOSSY_TRANSFER_SYNTAXES


def build_overlay(
    source: Dataset,
    rgb: np.ndarray,
    analysis: PhotoAnalysis,
    *,
    algorithm_version: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = OVERLAY_SERIES_NUMBER,
    instance_number: int = 1,
    content_datetime: datetime | None = None,
    max_long_side: int | None = DEFAULT_MAX_LONG_SIDE,
    software_versions: Sequence[str] | None = None,
) -> hd.sc.SCImage:
    """Build the Secondary Capture with the result burned in.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The source photograph.
    rgb : numpy.ndarray
        Its decoded pixels, ``(Rows, Columns, 3)`` uint8.
    analysis : dermpacs.analysis.PhotoAnalysis
        The result to draw.
    algorithm_version : str
        Version of the model that produced ``analysis``.
    series_instance_uid, sop_instance_uid : str
        UIDs of the new object.
    series_number, instance_number : int, optional
        Series and instance numbers of the new object.
    content_datetime : datetime.datetime, optional
        The job's time (Content and Secondary Capture Date/Time); ``None`` keeps the build time.
    max_long_side : int or None, optional
        Long side of the overlay image in pixels at most; ``None`` keeps the photo's size.
    software_versions : sequence of str, optional
        Software Versions of the contributing equipment; defaults to ``[algorithm_version]``.

    Returns
    -------
    highdicom.sc.SCImage
        The Secondary Capture Image, RGB, Explicit VR Little Endian.

    Raises
    ------
    ResultBuildError
        When the pixels or label map do not match the source.
    dermpacs.imaging.codes.UnknownCodeError
        When the finding is not a known class.
    """
    rgb = np.asarray(rgb)
    _check_inputs(source, rgb, analysis)
    if not algorithm_version:
        raise ResultBuildError("algorithm_version is empty")
    pixels = render_overlay(
        rgb, analysis, algorithm_version=algorithm_version, max_long_side=max_long_side
    )
    orientation = source.get("PatientOrientation")
    has_orientation = orientation is not None and len(orientation) == 2
    versions = list(software_versions) if software_versions else [algorithm_version]
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source_header(source),
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=SOFTWARE_NAME,
            # highdicom requires an orientation for the PATIENT coordinate system; a photo
            # seldom has one, and the placeholder is blanked below.
            patient_orientation=tuple(orientation) if has_orientation else ("A", "F"),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            contributing_equipment=[contributing_equipment(versions, content_datetime)],
            series_description="dermpacs result overlay (not for clinical use)",
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ResultBuildError(f"cannot build the overlay for this source: {exc}") from exc
    if not has_orientation:
        sc.PatientOrientation = []  # Type 2C: unknown for a photo (PS3.3 C.7.6.1)
    sc.Laterality = source.get("Laterality", "")  # Type 2C in General Series
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # made on a workstation (PS3.3 C.8.6.1)
    sc.ManufacturerModelName = SOFTWARE_NAME
    sc.add_new(0x00181020, "LO", versions)  # Software Versions
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = "Photo with skin and lesion outlines, crop boxes and legend"
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = source.SOPClassUID
    referenced.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = dicom_codes.DCM.SourceImageForImageProcessingOperation
    referenced.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(purpose)]
    sc.SourceImageSequence = [referenced]
    if _source_was_lossy(source):
        # Pixels that were once lossy-compressed stay marked as such (PS3.3 C.7.6.1.1.5).
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                setattr(sc, keyword, source[keyword].value)
    else:
        sc.LossyImageCompression = "00"
    if content_datetime is not None:
        set_content_datetime(sc, content_datetime)
        sc.DateOfSecondaryCapture = DA(content_datetime.date())
        sc.TimeOfSecondaryCapture = TM(content_datetime.time())
    return sc


__all__ = [
    "DEFAULT_MAX_LONG_SIDE",
    "NOT_FOR_CLINICAL_USE",
    "OVERLAY_SERIES_NUMBER",
    "build_overlay",
    "render_overlay",
]
