"""Test helpers for the DICOM writers: validators and small source photographs.

``dciodvfy_errors`` runs dicom3tools' ``dciodvfy`` on a data set and returns its ``Error``
lines; ``dsrdump`` runs dcmtk's SR dumper. The ``make_*`` factories build the three kinds of
source photograph the writers are tested on (a VL Photographic Image written with pydicom, a
Secondary Capture written with highdicom, and a JPEG wrapped by dcmtk ``img2dcm -vlp`` as a
camera would send it), each with a known RGB array and a label map with a known lesion.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dermpacs.analysis import BACKGROUND, LESION, SKIN, Crop, PhotoAnalysis, QualityFlag

DCIODVFY = shutil.which("dciodvfy")
DSRDUMP = shutil.which("dsrdump")
IMG2DCM = shutil.which("img2dcm")


def _write_temp(dataset: Dataset, directory: Path) -> Path:
    path = directory / "object.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_report(dataset: Dataset) -> str:
    """Return everything ``dciodvfy`` prints for ``dataset`` (written to a temporary file)."""
    if DCIODVFY is None:
        raise RuntimeError("dciodvfy (Debian package dicom3tools) is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_temp(dataset, Path(tmp))
        completed = subprocess.run(
            [DCIODVFY, str(path)], capture_output=True, text=True, timeout=120
        )
    return completed.stdout + completed.stderr


def dciodvfy_errors(dataset: Dataset) -> list[str]:
    """Return the lines of ``dciodvfy`` output that start with ``Error``."""
    return [line for line in dciodvfy_report(dataset).splitlines() if line.startswith("Error")]


def dsrdump(dataset: Dataset) -> subprocess.CompletedProcess[str]:
    """Run dcmtk ``dsrdump`` on ``dataset``; the caller checks ``returncode`` and output."""
    if DSRDUMP is None:
        raise RuntimeError("dsrdump (Debian package dcmtk) is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_temp(dataset, Path(tmp))
        return subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=120)


# --- source photographs -----------------------------------------------------------------


@dataclass(frozen=True)
class SourcePhoto:
    """A source photograph as the writers receive it: the data set and its decoded pixels."""

    kind: str
    dataset: Dataset
    rgb: np.ndarray


def synthetic_photo(rows: int = 96, columns: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(rgb, label_map)``: a skin-coloured ellipse with a red lesion on a blue cloth.

    The label map is exact for the drawing: BACKGROUND outside the ellipse, SKIN inside,
    LESION inside the lesion disc.
    """
    yy, xx = np.mgrid[0:rows, 0:columns]
    cy, cx = rows / 2, columns / 2
    skin = ((yy - cy) / (rows * 0.42)) ** 2 + ((xx - cx) / (columns * 0.42)) ** 2 <= 1.0
    lesion = (yy - cy * 0.9) ** 2 + (xx - cx * 1.1) ** 2 <= (min(rows, columns) * 0.15) ** 2
    lesion &= skin
    rgb = np.empty((rows, columns, 3), dtype=np.uint8)
    rgb[...] = (40, 60, 140)
    rgb[skin] = (224, 172, 140)
    rgb[lesion] = (170, 50, 60)
    label_map = np.full((rows, columns), BACKGROUND, dtype=np.uint8)
    label_map[skin] = SKIN
    label_map[lesion] = LESION
    return rgb, label_map


def _patient_study(ds: Dataset) -> None:
    ds.PatientName = "Test^Photo"
    ds.PatientID = "DERM-0001"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = "20240501"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"


def make_vl_photographic(rgb: np.ndarray) -> Dataset:
    """Build a VL Photographic Image (PS3.3 A.32.4) with native RGB pixels, via pydicom."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    _patient_study(ds)
    ds.Modality = "XC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.Laterality = "L"
    ds.Manufacturer = "Clinic Camera Co"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ContentDate = "20240501"
    ds.ContentTime = "101501"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.LossyImageCompression = "00"
    ds.AcquisitionContextSequence = []
    region = Dataset()  # skin of forearm: a body part photographed in dermatology
    region.CodeValue = "14975008"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Forearm"
    ds.AnatomicRegionSequence = [region]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    return ds


def make_secondary_capture(rgb: np.ndarray) -> Dataset:
    """Build a Secondary Capture Image of the photo with highdicom."""
    sc = hd.sc.SCImage(
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Scanner Co",
        patient_id="DERM-0002",
        patient_name="Test^Scan",
        patient_birth_date="19700101",
        patient_sex="M",
        accession_number="ACC0002",
        study_id="2",
        study_date="20240502",
        study_time="090000",
        referring_physician_name="",
        patient_orientation=("L", "F"),
        laterality="L",
    )
    return pydicom.dcmread(io.BytesIO(_to_bytes(sc)))


def make_img2dcm_vlp(rgb: np.ndarray, directory: Path) -> tuple[Dataset, np.ndarray]:
    """Wrap a pillow JPEG of ``rgb`` with dcmtk ``img2dcm -vlp``, as a camera would send it.

    Returns the data set and the RGB pixels that the JPEG decodes to (JPEG is lossy, so
    these differ slightly from ``rgb``).
    """
    if IMG2DCM is None:
        raise RuntimeError("img2dcm (Debian package dcmtk) is not installed")
    jpeg_path = directory / "photo.jpg"
    Image.fromarray(rgb).save(jpeg_path, format="JPEG", quality=92)
    dicom_path = directory / "photo.dcm"
    subprocess.run(
        [IMG2DCM, "-vlp", str(jpeg_path), str(dicom_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with Image.open(jpeg_path) as image:
        decoded = np.asarray(image.convert("RGB"))
    return pydicom.dcmread(dicom_path), decoded


def _to_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def roundtrip(dataset: Dataset) -> Dataset:
    """Write ``dataset`` to bytes and read it back, as a PACS would store it."""
    return pydicom.dcmread(io.BytesIO(_to_bytes(dataset)))


def make_sources(directory: Path, rows: int = 96, columns: int = 128) -> list[SourcePhoto]:
    """Return one source photograph of each kind, all showing the same synthetic scene."""
    rgb, _ = synthetic_photo(rows, columns)
    vlp_dataset, vlp_rgb = make_img2dcm_vlp(rgb, directory)
    return [
        SourcePhoto("vl-photographic", make_vl_photographic(rgb), rgb),
        SourcePhoto("secondary-capture", make_secondary_capture(rgb), rgb),
        SourcePhoto("img2dcm-vlp", vlp_dataset, vlp_rgb),
    ]


# --- analyses ---------------------------------------------------------------------------

CLASS_NAMES = ("atopic_dermatitis", "mycosis_fungoides", "impetigo", "herpesvirus_infection")


def make_analysis(
    label_map: np.ndarray,
    *,
    finding: str = "atopic_dermatitis",
    crops: tuple[tuple[int, int, int, int], ...] | None = None,
    whole_image_fallback: bool = False,
    quality_flags: tuple[QualityFlag, ...] = (),
    ita_degrees: float | None = 35.25,
    ita_category: str | None = "intermediate",
    model_version: str = "0.1.0",
) -> PhotoAnalysis:
    """Return a consistent PhotoAnalysis for ``label_map`` (no model involved).

    Fractions are computed from the label map; ``finding`` gets probability 0.61 and the other
    classes share the rest; crops default to two windows around the lesion.
    """
    rows, columns = label_map.shape
    skin = label_map != BACKGROUND
    lesion = label_map == LESION
    if crops is None:
        crops = (
            (rows // 4, columns // 4, rows // 4 + rows // 2, columns // 4 + columns // 2),
            (rows // 5, columns // 3, rows // 5 + rows // 2, columns // 3 + columns // 2),
        )
    others = [name for name in CLASS_NAMES if name != finding]
    probabilities = {finding: 0.61, others[0]: 0.2, others[1]: 0.12, others[2]: 0.07}

    def crop_of(box: tuple[int, int, int, int]) -> Crop:
        window = (slice(box[0], box[2]), slice(box[1], box[3]))
        return Crop(
            box=box,
            skin_fraction=float(skin[window].mean()),
            lesion_fraction=float(lesion[window].mean()),
            probabilities=probabilities,
        )

    return PhotoAnalysis(
        label_map=label_map,
        skin_fraction=float(skin.mean()),
        lesion_fraction=float(lesion.mean()),
        lesion_fraction_of_skin=float(lesion.sum() / skin.sum()) if skin.any() else 0.0,
        crops=tuple(crop_of(box) for box in crops),
        probabilities=probabilities,
        finding=finding,
        atopic_dermatitis_probability=probabilities["atopic_dermatitis"],
        ita_degrees=ita_degrees,
        ita_category=ita_category,
        quality_flags=quality_flags,
        whole_image_fallback=whole_image_fallback,
        model_version=model_version,
    )
