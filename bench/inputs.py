"""Benchmark inputs: camera-like JPEG photos (dcmtk ``img2dcm``) and uncompressed photos.

The picture is a synthetic clinical long shot from :mod:`dermpacs.training.synth` at 4000 x 3000
(a 12-megapixel camera), with sensor-like noise added so that its JPEG at quality 90 is as
large as a phone camera's (about 2.9 MB; without noise the smooth synthetic picture would
compress to 1.3 MB and flatter every receiver). The 4- and 1-megapixel and 640 x 480 versions
are the same scene rendered at their own size, with the same noise. The JPEG is wrapped by
``img2dcm -vlp`` without re-encoding: VL Photographic, JPEG Baseline, YBR_FULL_422, as many
clinic systems send. The 640 x 480 photo is uncompressed RGB in Explicit VR Little Endian.

Generated pictures and template files are cached under ``var/bench/cache``; each run then writes
as many copies as it sends, each with its own SOP Instance UID (receivers keep one object per
UID, and dermpacs answers a second copy from its job store without spooling it again).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.services import REPO, dcmtk

CACHE = REPO / "var" / "bench" / "cache"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
JPEG_QUALITY = 90
NOISE_LUMA_SIGMA = 4.0  # 8-bit levels; a phone sensor at ISO 100-400 after its own processing
NOISE_CHROMA_SIGMA = 2.0
SYNTH_SEED = 2023


@dataclass(frozen=True)
class PhotoSize:
    """One size of benchmark photo."""

    name: str
    columns: int
    rows: int

    @property
    def megapixels(self) -> float:
        return self.rows * self.columns / 1e6


SIZES = {
    "12mp": PhotoSize("12mp", 4000, 3000),
    "4mp": PhotoSize("4mp", 2304, 1728),
    "1mp": PhotoSize("1mp", 1152, 864),
    "vga": PhotoSize("vga", 640, 480),
}


def _synthetic_picture(size: PhotoSize) -> np.ndarray:
    """The synthetic clinical photo rendered at ``size``, without noise (cached as .npy).

    The first landscape 4:3 photo of the set: the same scene at every size (the generator's
    random draws do not depend on the size), as cameras of different resolutions would see it.
    """
    path = CACHE / f"synth-{SYNTH_SEED}-{size.columns}x{size.rows}.npy"
    if path.is_file():
        return np.load(path)
    from dermpacs.training.synth import generate_photo

    for index in range(64):
        photo = generate_photo(SYNTH_SEED, index, long_side=size.columns)
        if photo.image.shape[:2] == (size.rows, size.columns):
            CACHE.mkdir(parents=True, exist_ok=True)
            np.save(path, photo.image)
            return photo.image
    raise RuntimeError(f"no {size.columns}x{size.rows} photo among the first 64 of the set")


def camera_picture(size: PhotoSize) -> np.ndarray:
    """The benchmark picture at ``size``: the synthetic photo plus sensor-like noise."""
    base = _synthetic_picture(size)
    rng = np.random.default_rng([SYNTH_SEED, size.columns, size.rows])
    noise = rng.normal(0.0, NOISE_LUMA_SIGMA, base.shape[:2]).astype(np.float32)[..., None]
    noise = noise + rng.normal(0.0, NOISE_CHROMA_SIGMA, base.shape).astype(np.float32)
    return np.clip(np.rint(base.astype(np.float32) + noise), 0, 255).astype(np.uint8)


def camera_dicom(size: PhotoSize) -> Path:
    """A camera file: the picture as JPEG (quality 90) wrapped by ``img2dcm -vlp`` (cached)."""
    target = CACHE / f"camera-{size.name}-q{JPEG_QUALITY}.dcm"
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    jpeg = CACHE / f"camera-{size.name}-q{JPEG_QUALITY}.jpg"
    buffer = io.BytesIO()
    Image.fromarray(camera_picture(size)).save(buffer, "JPEG", quality=JPEG_QUALITY)
    jpeg.write_bytes(buffer.getvalue())
    partial = target.with_suffix(".part")
    subprocess.run(
        [dcmtk("img2dcm"), "-vlp", str(jpeg), str(partial)], check=True, capture_output=True
    )
    partial.replace(target)
    return target


def native_dicom(size: PhotoSize) -> Path:
    """An uncompressed RGB VL Photographic file of the picture at ``size`` (cached)."""
    target = CACHE / f"native-{size.name}-rgb.dcm"
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    rgb = camera_picture(size)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = VL_PHOTOGRAPHIC
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID = VL_PHOTOGRAPHIC
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "XC"
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.PixelData = rgb.tobytes()
    partial = target.with_suffix(".part")
    ds.save_as(partial, enforce_file_format=True)
    partial.replace(target)
    return target


def input_file(kind: str, size_name: str) -> Path:
    """``kind`` ``camera`` (img2dcm JPEG) or ``native`` (uncompressed RGB) at a named size."""
    size = SIZES[size_name]
    if kind == "camera":
        return camera_dicom(size)
    if kind == "native":
        return native_dicom(size)
    raise ValueError(f"unknown input kind {kind!r}")


def storescu_syntax_options(kind: str) -> list[str]:
    """storescu's options to send a ``kind`` of input in its own transfer syntax.

    storescu proposes uncompressed syntaxes unless told; ``-xy``: JPEG Baseline (FIELD-NOTES).
    """
    return ["-xy"] if kind == "camera" else []


def unique_copies(
    template: Path, folder: Path, count: int, *, study_per_copy: bool = False
) -> list[Path]:
    """``count`` copies of ``template`` with new SOP Instance UIDs (and studies, if asked).

    The pixel data is copied as it is (the JPEG codestream is not touched).
    """
    folder.mkdir(parents=True, exist_ok=True)
    ds = dcmread(template)
    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(count):
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.StudyInstanceUID = generate_uid() if study_per_copy else study
        ds.SeriesInstanceUID = generate_uid() if study_per_copy else series
        ds.InstanceNumber = index + 1
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def describe_file(path: Path) -> dict[str, object]:
    """Size, dimensions and encoding of a benchmark input, for the report."""
    ds = dcmread(path, stop_before_pixels=True)
    return {
        "file_bytes": path.stat().st_size,
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID.name),
        "photometric": str(ds.PhotometricInterpretation),
        "sha256_12": hashlib.sha256(path.read_bytes()).hexdigest()[:12],
    }


def describe_inputs(paths: Sequence[Path]) -> str:
    return json.dumps([describe_file(p) for p in paths])
