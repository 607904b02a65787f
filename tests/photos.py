"""Test photographs built in memory: each SOP class, transfer syntax and colour kind dermpacs reads.

The picture is the same everywhere: a synthetic close-up of skin with one lesion on a cloth
background (:func:`skin_photo`), with its label map, so that decoder, writer and method tests
can share it. :data:`PHOTO_KINDS` lists each supported encoding; :func:`make_photo` returns a
data set of that kind with the RGB a correct decoder must produce and the tolerance allowed
(0 for lossless encodings). Compressed kinds are made with the encoders real systems use:
pillow's libjpeg for camera JPEGs, pydicom's encoders (pyjpegls, pylibjpeg-openjpeg, RLE),
dcmtk's ``dcmcjpeg`` for JPEG lossless and extended, OpenJPH's ``ojph_compress`` for HTJ2K,
and dcmtk's ``img2dcm -vlp`` as a stand-in for a camera (:func:`make_img2dcm_photo`).

Objects that must be refused are here too (:func:`make_ct_slice`, :func:`make_basic_text_sr`,
:func:`make_multiframe_photo`, :func:`make_oversized_header`), for the decoder's and the
listener's tests.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from dermpacs.analysis import BACKGROUND, LESION, SKIN

ROWS, COLUMNS = 96, 128

VL_PHOTOGRAPHIC = UID("1.2.840.10008.5.1.4.1.1.77.1.4")
DERMOSCOPIC_PHOTOGRAPHY = UID("1.2.840.10008.5.1.4.1.1.77.1.7")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_TRUE_COLOR_SC = UID("1.2.840.10008.5.1.4.1.1.7.4")
CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")

_MODALITY = {
    VL_PHOTOGRAPHIC: "XC",  # external-camera photography
    DERMOSCOPIC_PHOTOGRAPHY: "DMS",  # dermoscopy (PS3.3 C.7.3.1.1.1)
    SECONDARY_CAPTURE: "OT",
    MULTIFRAME_TRUE_COLOR_SC: "OT",
}

# --- the picture --------------------------------------------------------------------------


def skin_photo(
    rows: int = ROWS, columns: int = COLUMNS, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic clinical close-up: skin with one lesion on a cloth background.

    Parameters
    ----------
    rows, columns : int
        Size of the picture.
    seed : int
        Seed of the texture noise and of the lesion's outline; the same seed gives the
        same picture.

    Returns
    -------
    rgb : numpy.ndarray
        ``rows x columns x 3`` ``uint8``.
    labels : numpy.ndarray
        ``rows x columns`` ``uint8`` with ``BACKGROUND``, ``SKIN`` and ``LESION`` of
        :mod:`dermpacs.analysis`; lesion pixels lie inside the skin.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float64)
    v = y / max(rows - 1, 1)
    u = x / max(columns - 1, 1)

    # A forearm seen from above: an ellipse slightly off centre, about 55 % of the frame.
    skin = ((u - 0.48) / 0.46) ** 2 + ((v - 0.52) / 0.42) ** 2 <= 1.0
    # An irregular lesion: a wobbly ellipse inside the skin.
    angle = np.arctan2(v - 0.47, u - 0.55)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    wobble = (
        1.0
        + 0.12 * np.sin(3 * angle + phases[0])
        + 0.07 * np.sin(5 * angle + phases[1])
        + 0.05 * np.sin(7 * angle + phases[2])
    )
    radius = np.sqrt(((u - 0.55) / 0.15) ** 2 + ((v - 0.47) / 0.17) ** 2)
    lesion = (radius <= wobble) & skin

    labels = np.full((rows, columns), BACKGROUND, dtype=np.uint8)
    labels[skin] = SKIN
    labels[lesion] = LESION

    rgb = np.empty((rows, columns, 3), dtype=np.float64)
    # Blue-grey drape with a soft gradient.
    rgb[...] = np.array([88.0, 104.0, 128.0]) + 30.0 * (u - 0.5)[..., None]
    # Skin: a light skin tone (ITA about 40 degrees), shaded like a rounded limb.
    shading = 0.82 + 0.18 * np.cos(np.clip(((v - 0.52) / 0.42), -1, 1) * np.pi / 2)
    skin_tone = np.array([226.0, 178.0, 150.0])
    rgb[skin] = (skin_tone * shading[..., None])[skin]
    # Lesion: red-brown erythema, darker towards the centre.
    core = np.clip(1.0 - radius / wobble, 0, 1)
    lesion_tone = np.array([186.0, 86.0, 74.0]) - 60.0 * core[..., None] * np.array([1, 0.6, 0.5])
    rgb[lesion] = lesion_tone[lesion]
    # Skin texture and sensor noise.
    rgb += rng.normal(0.0, 4.0, size=rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), labels


def skin_photo_rgb(rows: int = ROWS, columns: int = COLUMNS, *, seed: int = 0) -> np.ndarray:
    """The RGB picture of :func:`skin_photo`."""
    return skin_photo(rows, columns, seed=seed)[0]


def grey_of(rgb: np.ndarray) -> np.ndarray:
    """Luma of an RGB picture (ITU-R BT.601 weights), ``uint8``."""
    weights = np.array([0.299, 0.587, 0.114])
    return np.clip(np.rint(rgb.astype(np.float64) @ weights), 0, 255).astype(np.uint8)


# --- data sets ----------------------------------------------------------------------------


def photo_dataset(
    samples: np.ndarray,
    *,
    sop_class_uid: str = VL_PHOTOGRAPHIC,
    photometric: str = "RGB",
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    planar_configuration: int = 0,
    bits_stored: int | None = None,
    pixel_representation: int = 0,
    uid_seed: str = "photo",
    number_of_frames: int | None = None,
) -> Dataset:
    """A photograph data set with native pixel data and full patient/study/series modules.

    Parameters
    ----------
    samples : numpy.ndarray
        The stored samples: ``rows x columns`` (one sample per pixel) or
        ``rows x columns x 3``, already in the colour space ``photometric`` names; or
        ``frames x rows x columns x 3`` with ``number_of_frames``. ``uint8``, ``uint16``
        or ``int16``.
    sop_class_uid, photometric, transfer_syntax_uid : str
        What the data set says it is.
    planar_configuration : int
        0 (RGBRGB...) or 1 (RR..GG..BB..) for three samples per pixel.
    bits_stored : int, optional
        Defaults to the sample type's size.
    pixel_representation : int
        1 for signed samples.
    uid_seed : str
        Seed for the deterministic UIDs, so that a kind always gets the same UIDs.
    number_of_frames : int, optional
        Writes (0028,0008) when given.

    Returns
    -------
    pydicom.dataset.Dataset
        With ``file_meta`` (transfer syntax, SOP class and instance).
    """
    sop_class_uid = UID(sop_class_uid)
    frame_shape = samples.shape[1:] if number_of_frames is not None else samples.shape
    rows, columns = frame_shape[:2]
    samples_per_pixel = frame_shape[2] if len(frame_shape) == 3 else 1
    bits_allocated = samples.dtype.itemsize * 8

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "instance"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "A0001"
    ds.Modality = _MODALITY.get(sop_class_uid, "OT")
    ds.Manufacturer = "dermpacs test photographs"
    ds.ReferringPhysicianName = ""
    # Patient module (PS3.3 C.7.1.1)
    ds.PatientName = "Photo^Test"
    ds.PatientID = "DERM-0001"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    # General Study, General Series, General Image
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    if sop_class_uid == DERMOSCOPIC_PHOTOGRAPHY:
        ds.ImageLaterality = "L"
        region = Dataset()
        region.CodeValue = "14975008"
        region.CodingSchemeDesignator = "SCT"
        region.CodeMeaning = "Forearm"
        ds.AnatomicRegionSequence = Sequence([region])
    if sop_class_uid in (SECONDARY_CAPTURE, MULTIFRAME_TRUE_COLOR_SC):
        ds.ConversionType = "WSD"  # SC Equipment module (PS3.3 C.8.6.1)
    if sop_class_uid == MULTIFRAME_TRUE_COLOR_SC:
        ds.BurnedInAnnotation = "NO"
    if sop_class_uid in (VL_PHOTOGRAPHIC, DERMOSCOPIC_PHOTOGRAPHY):
        ds.AcquisitionContextSequence = Sequence()  # Acquisition Context module, Type 2
    # Image Pixel module (PS3.3 C.7.6.3)
    ds.SamplesPerPixel = samples_per_pixel
    ds.PhotometricInterpretation = photometric
    if samples_per_pixel > 1:
        ds.PlanarConfiguration = planar_configuration
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = pixel_representation
    if number_of_frames is not None:
        ds.NumberOfFrames = number_of_frames
    ds.LossyImageCompression = "00"
    ds.PixelData = _native_bytes(samples, planar_configuration, number_of_frames is not None)
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    return ds


def _native_bytes(samples: np.ndarray, planar_configuration: int, multi_frame: bool) -> bytes:
    if samples.shape[-1] == 3 and samples.ndim >= 3 and planar_configuration == 1:
        axes = (0, 3, 1, 2) if multi_frame else (2, 0, 1)
        samples = np.transpose(samples, axes)
    data = np.ascontiguousarray(samples).astype(samples.dtype.newbyteorder("<")).tobytes()
    return data + b"\x00" * (len(data) % 2)


def dicom_bytes(ds: Dataset) -> bytes:
    """The data set as a PS3.10 file (preamble, file meta), in its own transfer syntax."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _reread(data: bytes) -> Dataset:
    return pydicom.dcmread(BytesIO(data))


def _encapsulated(ds: Dataset, frame: bytes, transfer_syntax_uid: str, *, lossy: bool) -> Dataset:
    """Put one encoded frame into ``ds`` as encapsulated pixel data (PS3.5 A.4)."""
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    if lossy:
        ds.LossyImageCompression = "01"
    return ds


# --- YCbCr, palette and greyscale stored forms --------------------------------------------


def rgb_to_ybr_full(rgb: np.ndarray) -> np.ndarray:
    """RGB to YBR_FULL (PS3.3 C.7.6.3.1.2, full-range BT.601), rounded to ``uint8``."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


def ybr_full_to_rgb(ybr: np.ndarray) -> np.ndarray:
    """YBR_FULL to RGB with the inverse of :func:`rgb_to_ybr_full`, rounded to ``uint8``."""
    y, cb, cr = (ybr[..., i].astype(np.float64) for i in range(3))
    r = y + 1.402 * (cr - 128)
    g = y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128)
    b = y + 1.772 * (cb - 128)
    return np.clip(np.rint(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def _ybr_422_native(rgb: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Native YBR_FULL_422 bytes (Y1 Y2 Cb Cr per pixel pair) and the RGB they mean."""
    ybr = rgb_to_ybr_full(rgb).astype(np.float64)
    pairs = ybr.reshape(ybr.shape[0], ybr.shape[1] // 2, 2, 3)
    chroma = np.rint(pairs[:, :, :, 1:].mean(axis=2)).astype(np.uint8)  # rows, pairs, 2
    luma = pairs[:, :, :, 0].astype(np.uint8)  # rows, pairs, 2
    packed = np.concatenate([luma, chroma], axis=2)  # Y1 Y2 Cb Cr
    shared = np.repeat(chroma, 2, axis=1)
    meant = np.concatenate([ybr[..., :1].astype(np.uint8), shared], axis=2)
    return packed.tobytes(), ybr_full_to_rgb(meant)


def _palette(rgb: np.ndarray, colours: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Quantise ``rgb`` to ``colours``: indices and an ``N x 3`` ``uint8`` palette."""
    image = Image.fromarray(rgb).quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    indices = np.asarray(image, dtype=np.uint8)
    flat = image.getpalette() or []
    palette = np.array(flat[: colours * 3], dtype=np.uint8).reshape(-1, 3)
    return indices, palette


def _add_palette_luts(ds: Dataset, palette: np.ndarray, *, bits: int) -> None:
    """Palette Color LUT module (PS3.3 C.7.6.3.1.5/6) with ``bits`` per entry."""
    entries = palette.shape[0]
    for channel, colour in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [entries, 0, bits])
        if bits == 16:
            data = (palette[:, channel].astype(np.uint16) * 257).astype("<u2").tobytes()
        else:
            # 8-bit entries are stored like 8 bits allocated: one byte each, padded to even.
            data = palette[:, channel].astype(np.uint8).tobytes()
            data += b"\x00" * (len(data) % 2)
        setattr(ds, f"{colour}PaletteColorLookupTableData", data)
        ds[f"{colour}PaletteColorLookupTableData"].VR = "OW"
    ds["RedPaletteColorLookupTableDescriptor"].VR = "US"
    ds["GreenPaletteColorLookupTableDescriptor"].VR = "US"
    ds["BluePaletteColorLookupTableDescriptor"].VR = "US"


def _grey12(rgb: np.ndarray) -> np.ndarray:
    """12-bit grey stored in 16 bits, chosen so that scaling to 8 bits gives back the luma."""
    return np.rint(grey_of(rgb).astype(np.float64) * 4095 / 255).astype(np.uint16)


# --- encoders ------------------------------------------------------------------------------


def jpeg_bytes(rgb: np.ndarray, *, quality: int = 92, **options: object) -> bytes:
    """A JPEG written by pillow (libjpeg), as a camera writes one."""
    buffer = BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality, **options)
    return buffer.getvalue()


def reference_decode(codestream: bytes) -> np.ndarray:
    """Decode a JPEG or JPEG 2000 codestream with pillow: the independent reference."""
    with Image.open(BytesIO(codestream)) as image:
        if image.mode in ("L", "I;16", "I"):
            return np.asarray(image)
        return np.asarray(image.convert("RGB"))


def _charls_decode(codestream: bytes) -> np.ndarray:
    """Decode JPEG-LS with CharLS (pyjpegls): a reference independent of libjpeg's JPEG-LS."""
    import jpeg_ls

    return np.asarray(jpeg_ls.decode(np.frombuffer(codestream, dtype=np.uint8)))


def require_tool(name: str) -> str:
    """The path of a command-line tool; skips the test where it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def _dcmcjpeg(ds: Dataset, *options: str) -> Dataset:
    """Compress a native data set with dcmtk's dcmcjpeg and read the result back."""
    tool = require_tool("dcmcjpeg")
    with tempfile.TemporaryDirectory(prefix="dermpacs-photo-") as folder:
        source = Path(folder, "native.dcm")
        target = Path(folder, "jpeg.dcm")
        source.write_bytes(dicom_bytes(ds))
        subprocess.run([tool, *options, str(source), str(target)], check=True, capture_output=True)
        return _reread(target.read_bytes())


def _ojph_compress(rgb: np.ndarray, *, reversible: bool) -> bytes:
    """An HTJ2K codestream of an RGB picture made by OpenJPH (colour transform on)."""
    tool = require_tool("ojph_compress")
    with tempfile.TemporaryDirectory(prefix="dermpacs-photo-") as folder:
        source = Path(folder, "photo.ppm")
        target = Path(folder, "photo.j2c")
        Image.fromarray(rgb).save(source)
        command = [tool, "-i", str(source), "-o", str(target)]
        command += ["-reversible", "true" if reversible else "false"]
        subprocess.run(command, check=True, capture_output=True)
        return target.read_bytes()


def make_img2dcm_photo(tmp_path: Path, rgb: np.ndarray, *, quality: int = 90) -> Path:
    """A camera stand-in: a pillow JPEG wrapped by dcmtk ``img2dcm -vlp``.

    The result is what many clinic systems send: VL Photographic Image, JPEG Baseline,
    YBR_FULL_422 over 4:2:0 JPEG data, empty patient fields, no Laterality.

    Parameters
    ----------
    tmp_path : pathlib.Path
        A folder for the JPEG and the DICOM file.
    rgb : numpy.ndarray
        The picture, ``rows x columns x 3`` ``uint8``.
    quality : int
        JPEG quality.

    Returns
    -------
    pathlib.Path
        The DICOM file.
    """
    tool = require_tool("img2dcm")
    tmp_path.mkdir(parents=True, exist_ok=True)
    jpeg = tmp_path / "camera.jpg"
    jpeg.write_bytes(jpeg_bytes(rgb, quality=quality))
    target = tmp_path / "camera.dcm"
    subprocess.run([tool, "-vlp", str(jpeg), str(target)], check=True, capture_output=True)
    return target


# --- the catalogue of kinds ---------------------------------------------------------------


@dataclass(frozen=True)
class PhotoKind:
    """One way a photograph can arrive.

    ``build(rgb, uid_seed)`` returns ``(dataset, expected_rgb)``: the data set as received
    and the RGB a correct decoder returns, equal within ``tolerance`` (the largest absolute
    difference of any sample; 0 for lossless kinds). For lossy kinds the expected RGB is
    an independent decoding of the same codestream (pillow), so the tolerance covers only
    differences between decoder builds, and the mean difference stays below one level.
    """

    name: str
    sop_class_uid: str
    transfer_syntax_uid: str
    photometric: str
    tolerance: int
    build: Callable[[np.ndarray, str], tuple[Dataset, np.ndarray]]


def _native_rgb(sop: str, syntax: str, planar: int) -> Callable[..., tuple[Dataset, np.ndarray]]:
    def build(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
        ds = photo_dataset(
            rgb,
            sop_class_uid=sop,
            transfer_syntax_uid=syntax,
            planar_configuration=planar,
            uid_seed=seed,
        )
        return _reread(dicom_bytes(ds)), rgb

    return build


def _native_ybr_full(planar: int) -> Callable[..., tuple[Dataset, np.ndarray]]:
    def build(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
        ybr = rgb_to_ybr_full(rgb)
        ds = photo_dataset(
            ybr,
            sop_class_uid=DERMOSCOPIC_PHOTOGRAPHY,
            photometric="YBR_FULL",
            planar_configuration=planar,
            uid_seed=seed,
        )
        return _reread(dicom_bytes(ds)), ybr_full_to_rgb(ybr)

    return build


def _native_ybr_full_422(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
    data, meant = _ybr_422_native(rgb)
    ds = photo_dataset(
        rgb, sop_class_uid=SECONDARY_CAPTURE, photometric="YBR_FULL_422", uid_seed=seed
    )
    ds.PixelData = data
    return _reread(dicom_bytes(ds)), meant


def _native_grey(photometric: str) -> Callable[..., tuple[Dataset, np.ndarray]]:
    def build(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
        grey = grey_of(rgb)
        stored = 255 - grey if photometric == "MONOCHROME1" else grey
        ds = photo_dataset(
            stored, sop_class_uid=SECONDARY_CAPTURE, photometric=photometric, uid_seed=seed
        )
        return _reread(dicom_bytes(ds)), np.repeat(grey[..., None], 3, axis=2)

    return build


def _native_grey12(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
    ds = photo_dataset(
        _grey12(rgb),
        sop_class_uid=SECONDARY_CAPTURE,
        photometric="MONOCHROME2",
        bits_stored=12,
        uid_seed=seed,
    )
    return _reread(dicom_bytes(ds)), np.repeat(grey_of(rgb)[..., None], 3, axis=2)


def _native_grey_signed16(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
    grey = grey_of(rgb)
    stored = (grey.astype(np.int32) * 257 - 32768).astype(np.int16)  # full signed range
    ds = photo_dataset(
        stored,
        sop_class_uid=SECONDARY_CAPTURE,
        photometric="MONOCHROME2",
        pixel_representation=1,
        uid_seed=seed,
    )
    return _reread(dicom_bytes(ds)), np.repeat(grey[..., None], 3, axis=2)


def _native_grey16_windowed(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
    grey = grey_of(rgb)
    stored = (grey.astype(np.uint16) * 4 + 1000).astype(np.uint16)
    ds = photo_dataset(
        stored, sop_class_uid=SECONDARY_CAPTURE, photometric="MONOCHROME2", uid_seed=seed
    )
    ds.WindowCenter = 1512  # 1000 + 1024 / 2: the window spans the stored values
    ds.WindowWidth = 1024
    return _reread(dicom_bytes(ds)), np.repeat(grey[..., None], 3, axis=2)


def _native_palette(bits: int) -> Callable[..., tuple[Dataset, np.ndarray]]:
    def build(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
        indices, palette = _palette(rgb)
        ds = photo_dataset(
            indices, sop_class_uid=SECONDARY_CAPTURE, photometric="PALETTE COLOR", uid_seed=seed
        )
        _add_palette_luts(ds, palette, bits=bits)
        return _reread(dicom_bytes(ds)), palette[indices]

    return build


def _deflated_rgb(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
    ds = photo_dataset(rgb, transfer_syntax_uid=DeflatedExplicitVRLittleEndian, uid_seed=seed)
    return _reread(dicom_bytes(ds)), rgb


def _multiframe_one(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
    ds = photo_dataset(
        rgb[None],
        sop_class_uid=MULTIFRAME_TRUE_COLOR_SC,
        number_of_frames=1,
        uid_seed=seed,
    )
    return _reread(dicom_bytes(ds)), rgb


def _pillow_jpeg(
    sop: str, photometric: str, **options: object
) -> Callable[..., tuple[Dataset, np.ndarray]]:
    def build(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
        frame = jpeg_bytes(rgb, **options)
        ds = photo_dataset(rgb, sop_class_uid=sop, photometric=photometric, uid_seed=seed)
        ds = _encapsulated(ds, frame, JPEGBaseline8Bit, lossy=True)
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        return _reread(dicom_bytes(ds)), reference_decode(frame)

    return build


def _first_fragment(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _dcmcjpeg_rgb(*options: str) -> Callable[..., tuple[Dataset, np.ndarray]]:
    def build(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
        ds = _dcmcjpeg(photo_dataset(rgb, uid_seed=seed), *options)
        lossless = any(option in ("+e1", "+el") for option in options)
        return ds, rgb if lossless else reference_decode(_first_fragment(ds))

    return build


def _dcmcjpeg_grey12(*options: str) -> Callable[..., tuple[Dataset, np.ndarray]]:
    def build(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
        native = photo_dataset(
            _grey12(rgb),
            sop_class_uid=SECONDARY_CAPTURE,
            photometric="MONOCHROME2",
            bits_stored=12,
            uid_seed=seed,
        )
        return _dcmcjpeg(native, *options), np.repeat(grey_of(rgb)[..., None], 3, axis=2)

    return build


def _pydicom_compressed(
    syntax: str,
    photometric: str,
    *,
    lossy: bool = False,
    stored: str = "rgb",
    **options: object,
) -> Callable[..., tuple[Dataset, np.ndarray]]:
    def build(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
        expected = rgb
        if stored == "grey12":
            ds = photo_dataset(
                _grey12(rgb),
                sop_class_uid=SECONDARY_CAPTURE,
                photometric="MONOCHROME2",
                bits_stored=12,
                uid_seed=seed,
            )
            expected = np.repeat(grey_of(rgb)[..., None], 3, axis=2)
        elif stored == "palette":
            indices, palette = _palette(rgb)
            ds = photo_dataset(
                indices,
                sop_class_uid=SECONDARY_CAPTURE,
                photometric="PALETTE COLOR",
                uid_seed=seed,
            )
            _add_palette_luts(ds, palette, bits=16)
            expected = palette[indices]
        elif stored == "ybr_full":
            ybr = rgb_to_ybr_full(rgb)
            ds = photo_dataset(
                ybr, sop_class_uid=DERMOSCOPIC_PHOTOGRAPHY, photometric="YBR_FULL", uid_seed=seed
            )
            expected = ybr_full_to_rgb(ybr)
        else:
            ds = photo_dataset(rgb, uid_seed=seed)
        ds.compress(syntax, **options)  # type: ignore[arg-type]
        # pydicom applies the multiple-component transform and leaves the description to
        # the caller (PS3.5 8.2.4): say YBR_RCT / YBR_ICT as JPEG 2000 files do.
        ds.PhotometricInterpretation = photometric
        if lossy:
            ds.LossyImageCompression = "01"
            if syntax in (JPEG2000, HTJ2K):
                expected = reference_decode(_first_fragment(ds))
            elif syntax == JPEGLSNearLossless:
                expected = _charls_decode(_first_fragment(ds))
        return _reread(dicom_bytes(ds)), expected

    return build


def _htj2k(syntax: str, *, reversible: bool) -> Callable[..., tuple[Dataset, np.ndarray]]:
    def build(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
        frame = _ojph_compress(rgb, reversible=reversible)
        ds = photo_dataset(
            rgb,
            photometric="YBR_RCT" if reversible else "YBR_ICT",
            uid_seed=seed,
        )
        ds = _encapsulated(ds, frame, syntax, lossy=not reversible)
        return _reread(dicom_bytes(ds)), rgb if reversible else reference_decode(frame)

    return build


def _img2dcm(rgb: np.ndarray, seed: str) -> tuple[Dataset, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="dermpacs-photo-") as folder:
        path = make_img2dcm_photo(Path(folder), rgb)
        ds = _reread(path.read_bytes())
    return ds, reference_decode(_first_fragment(ds))


PHOTO_KINDS: tuple[PhotoKind, ...] = (
    # native pixel data
    PhotoKind(
        "vlp-explicit-rgb",
        VL_PHOTOGRAPHIC,
        ExplicitVRLittleEndian,
        "RGB",
        0,
        _native_rgb(VL_PHOTOGRAPHIC, ExplicitVRLittleEndian, 0),
    ),
    PhotoKind(
        "vlp-implicit-rgb-planar1",
        VL_PHOTOGRAPHIC,
        ImplicitVRLittleEndian,
        "RGB",
        0,
        _native_rgb(VL_PHOTOGRAPHIC, ImplicitVRLittleEndian, 1),
    ),
    PhotoKind(
        "sc-implicit-rgb",
        SECONDARY_CAPTURE,
        ImplicitVRLittleEndian,
        "RGB",
        0,
        _native_rgb(SECONDARY_CAPTURE, ImplicitVRLittleEndian, 0),
    ),
    PhotoKind(
        "vlp-deflated-rgb",
        VL_PHOTOGRAPHIC,
        DeflatedExplicitVRLittleEndian,
        "RGB",
        0,
        _deflated_rgb,
    ),
    PhotoKind(
        "mfsc-explicit-rgb-one-frame",
        MULTIFRAME_TRUE_COLOR_SC,
        ExplicitVRLittleEndian,
        "RGB",
        0,
        _multiframe_one,
    ),
    PhotoKind(
        "dms-explicit-ybr-full",
        DERMOSCOPIC_PHOTOGRAPHY,
        ExplicitVRLittleEndian,
        "YBR_FULL",
        1,  # pydicom's and this module's YCbCr inverse may round differently
        _native_ybr_full(0),
    ),
    PhotoKind(
        "dms-explicit-ybr-full-planar1",
        DERMOSCOPIC_PHOTOGRAPHY,
        ExplicitVRLittleEndian,
        "YBR_FULL",
        1,
        _native_ybr_full(1),
    ),
    PhotoKind(
        "sc-explicit-ybr-full-422",
        SECONDARY_CAPTURE,
        ExplicitVRLittleEndian,
        "YBR_FULL_422",
        1,
        _native_ybr_full_422,
    ),
    PhotoKind(
        "sc-explicit-monochrome2",
        SECONDARY_CAPTURE,
        ExplicitVRLittleEndian,
        "MONOCHROME2",
        0,
        _native_grey("MONOCHROME2"),
    ),
    PhotoKind(
        "sc-explicit-monochrome1",
        SECONDARY_CAPTURE,
        ExplicitVRLittleEndian,
        "MONOCHROME1",
        0,
        _native_grey("MONOCHROME1"),
    ),
    PhotoKind(
        "sc-explicit-monochrome2-12bit",
        SECONDARY_CAPTURE,
        ExplicitVRLittleEndian,
        "MONOCHROME2",
        0,
        _native_grey12,
    ),
    PhotoKind(
        "sc-explicit-monochrome2-signed16",
        SECONDARY_CAPTURE,
        ExplicitVRLittleEndian,
        "MONOCHROME2",
        0,
        _native_grey_signed16,
    ),
    PhotoKind(
        "sc-explicit-monochrome2-16bit-window",
        SECONDARY_CAPTURE,
        ExplicitVRLittleEndian,
        "MONOCHROME2",
        1,  # the linear VOI function maps 1024 values onto 0-255 with a fraction
        _native_grey16_windowed,
    ),
    PhotoKind(
        "sc-explicit-palette-16bit-lut",
        SECONDARY_CAPTURE,
        ExplicitVRLittleEndian,
        "PALETTE COLOR",
        0,
        _native_palette(16),
    ),
    PhotoKind(
        "sc-explicit-palette-8bit-lut",
        SECONDARY_CAPTURE,
        ExplicitVRLittleEndian,
        "PALETTE COLOR",
        0,
        _native_palette(8),
    ),
    # JPEG, as cameras write it (pillow / libjpeg); expected: pillow's own decoding
    PhotoKind(
        "vlp-jpeg-baseline-ybr-422",
        VL_PHOTOGRAPHIC,
        JPEGBaseline8Bit,
        "YBR_FULL_422",
        8,  # libjpeg 9 and libjpeg-turbo upsample chroma differently at colour edges
        _pillow_jpeg(VL_PHOTOGRAPHIC, "YBR_FULL_422", subsampling=1),
    ),
    PhotoKind(
        "vlp-jpeg-baseline-ybr-420-as-422",
        VL_PHOTOGRAPHIC,
        JPEGBaseline8Bit,
        "YBR_FULL_422",
        8,
        _pillow_jpeg(VL_PHOTOGRAPHIC, "YBR_FULL_422", subsampling=2),
    ),
    PhotoKind(
        "dms-jpeg-baseline-ybr-full",
        DERMOSCOPIC_PHOTOGRAPHY,
        JPEGBaseline8Bit,
        "YBR_FULL",
        8,
        _pillow_jpeg(DERMOSCOPIC_PHOTOGRAPHY, "YBR_FULL", subsampling=0),
    ),
    PhotoKind(
        "sc-jpeg-baseline-rgb",
        SECONDARY_CAPTURE,
        JPEGBaseline8Bit,
        "RGB",
        8,
        _pillow_jpeg(SECONDARY_CAPTURE, "RGB", keep_rgb=True),
    ),
    PhotoKind(
        "img2dcm-vlp-jpeg-baseline",
        VL_PHOTOGRAPHIC,
        JPEGBaseline8Bit,
        "YBR_FULL_422",
        8,
        _img2dcm,
    ),
    # JPEG written by dcmtk
    PhotoKind(
        "vlp-jpeg-extended-ybr-422",
        VL_PHOTOGRAPHIC,
        JPEGExtended12Bit,
        "YBR_FULL_422",
        8,
        _dcmcjpeg_rgb("+ee"),
    ),
    PhotoKind(
        "sc-jpeg-extended-12bit-grey",
        SECONDARY_CAPTURE,
        JPEGExtended12Bit,
        "MONOCHROME2",
        2,  # lossy 12-bit samples, then scaled to 8 bits
        # +sr keeps the stored values (by default dcmcjpeg shifts them to start at 0)
        _dcmcjpeg_grey12("+ee", "+sr", "+q", "95"),
    ),
    PhotoKind(
        "vlp-jpeg-lossless-sv1-rgb",
        VL_PHOTOGRAPHIC,
        JPEGLosslessSV1,
        "RGB",
        0,
        _dcmcjpeg_rgb("+e1"),
    ),
    PhotoKind(
        "vlp-jpeg-lossless-rgb",
        VL_PHOTOGRAPHIC,
        JPEGLossless,
        "RGB",
        0,
        _dcmcjpeg_rgb("+el"),
    ),
    PhotoKind(
        "sc-jpeg-lossless-12bit-grey",
        SECONDARY_CAPTURE,
        JPEGLossless,
        "MONOCHROME2",
        0,
        _dcmcjpeg_grey12("+el"),
    ),
    # JPEG-LS, JPEG 2000 and RLE from pydicom's encoders
    PhotoKind(
        "vlp-jpegls-lossless-rgb",
        VL_PHOTOGRAPHIC,
        JPEGLSLossless,
        "RGB",
        0,
        _pydicom_compressed(JPEGLSLossless, "RGB"),
    ),
    PhotoKind(
        "vlp-jpegls-near-lossless-rgb",
        VL_PHOTOGRAPHIC,
        JPEGLSNearLossless,
        "RGB",
        0,  # the same codestream decoded by CharLS; NEAR = 2 bounds the loss itself
        _pydicom_compressed(JPEGLSNearLossless, "RGB", lossy=True, jls_error=2),
    ),
    PhotoKind(
        "vlp-j2k-lossless-ybr-rct",
        VL_PHOTOGRAPHIC,
        JPEG2000Lossless,
        "YBR_RCT",
        0,
        _pydicom_compressed(JPEG2000Lossless, "YBR_RCT"),
    ),
    PhotoKind(
        "vlp-j2k-lossless-rgb-no-mct",
        VL_PHOTOGRAPHIC,
        JPEG2000Lossless,
        "RGB",
        0,
        _pydicom_compressed(JPEG2000Lossless, "RGB", use_mct=False),
    ),
    PhotoKind(
        "vlp-j2k-lossy-ybr-ict",
        VL_PHOTOGRAPHIC,
        JPEG2000,
        "YBR_ICT",
        1,
        _pydicom_compressed(JPEG2000, "YBR_ICT", lossy=True, j2k_cr=[15]),
    ),
    PhotoKind(
        "sc-j2k-lossless-12bit-grey",
        SECONDARY_CAPTURE,
        JPEG2000Lossless,
        "MONOCHROME2",
        0,
        _pydicom_compressed(JPEG2000Lossless, "MONOCHROME2", stored="grey12"),
    ),
    PhotoKind(
        "vlp-rle-rgb",
        VL_PHOTOGRAPHIC,
        RLELossless,
        "RGB",
        0,
        _pydicom_compressed(RLELossless, "RGB"),
    ),
    PhotoKind(
        "dms-rle-ybr-full",
        DERMOSCOPIC_PHOTOGRAPHY,
        RLELossless,
        "YBR_FULL",
        1,
        _pydicom_compressed(RLELossless, "YBR_FULL", stored="ybr_full"),
    ),
    PhotoKind(
        "sc-rle-12bit-grey",
        SECONDARY_CAPTURE,
        RLELossless,
        "MONOCHROME2",
        0,
        _pydicom_compressed(RLELossless, "MONOCHROME2", stored="grey12"),
    ),
    PhotoKind(
        "sc-rle-palette",
        SECONDARY_CAPTURE,
        RLELossless,
        "PALETTE COLOR",
        0,
        _pydicom_compressed(RLELossless, "PALETTE COLOR", stored="palette"),
    ),
    # HTJ2K from OpenJPH (pydicom has no HTJ2K encoder)
    PhotoKind(
        "vlp-htj2k-lossless-ybr-rct",
        VL_PHOTOGRAPHIC,
        HTJ2KLossless,
        "YBR_RCT",
        0,
        _htj2k(HTJ2KLossless, reversible=True),
    ),
    PhotoKind(
        "vlp-htj2k-rpcl-lossless-ybr-rct",
        VL_PHOTOGRAPHIC,
        HTJ2KLosslessRPCL,
        "YBR_RCT",
        0,
        _htj2k(HTJ2KLosslessRPCL, reversible=True),  # OpenJPH writes RPCL by default
    ),
    PhotoKind(
        "vlp-htj2k-lossy-ybr-ict",
        VL_PHOTOGRAPHIC,
        HTJ2K,
        "YBR_ICT",
        1,
        _htj2k(HTJ2K, reversible=False),
    ),
)

PHOTO_KINDS_BY_NAME: dict[str, PhotoKind] = {kind.name: kind for kind in PHOTO_KINDS}


def make_photo(
    kind: str | PhotoKind = "vlp-jpeg-baseline-ybr-422",
    *,
    rows: int = ROWS,
    columns: int = COLUMNS,
    seed: int = 0,
) -> tuple[Dataset, np.ndarray]:
    """A photograph of one kind of :data:`PHOTO_KINDS` and the RGB it must decode to.

    Parameters
    ----------
    kind : str | PhotoKind
        A kind or its name.
    rows, columns : int
        Size of the picture (``columns`` even, for YBR_FULL_422).
    seed : int
        Picture seed of :func:`skin_photo`.

    Returns
    -------
    dataset : pydicom.dataset.Dataset
        The data set as a receiver parses it (written to bytes and read back).
    expected_rgb : numpy.ndarray
        ``rows x columns x 3`` ``uint8``; equal to the decoded photo within
        ``kind.tolerance``.
    """
    if isinstance(kind, str):
        kind = PHOTO_KINDS_BY_NAME[kind]
    rgb = skin_photo_rgb(rows, columns, seed=seed)
    return kind.build(rgb, f"{kind.name}-{rows}x{columns}-{seed}")


# --- objects to refuse --------------------------------------------------------------------


def make_ct_slice(rows: int = 64, columns: int = 64) -> Dataset:
    """A small CT Image: an image, but not a photograph."""
    body = (np.hypot(*np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : columns * 1j]) < 0.8) * 1040
    ds = photo_dataset(
        body.astype(np.uint16),
        sop_class_uid=CT_IMAGE,
        photometric="MONOCHROME2",
        bits_stored=12,
        uid_seed="ct",
    )
    ds.Modality = "CT"
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 2.5
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["ct", "for"])
    return ds


def make_basic_text_sr() -> Dataset:
    """A Basic Text SR: a DICOM object without pixels."""
    ds = photo_dataset(np.zeros((2, 2), np.uint8), uid_seed="sr")
    for keyword in (
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
        "LossyImageCompression",
        "ImageType",
        "AcquisitionContextSequence",
        "PatientOrientation",
    ):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    title = Dataset()
    title.CodeValue = "121144"
    title.CodingSchemeDesignator = "DCM"
    title.CodeMeaning = "Document Title"
    ds.ConceptNameCodeSequence = Sequence([title])
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    text.ConceptNameCodeSequence = Sequence([title])
    text.TextValue = "Not a photograph."
    ds.ContentSequence = Sequence([text])
    return ds


def make_multiframe_photo(frames: int = 2) -> Dataset:
    """A Multi-frame True Color SC with more than one frame."""
    rgb = skin_photo_rgb()
    stack = np.stack([rgb] * frames)
    return photo_dataset(
        stack,
        sop_class_uid=MULTIFRAME_TRUE_COLOR_SC,
        number_of_frames=frames,
        uid_seed=f"multiframe-{frames}",
    )


def make_oversized_header(megapixels: float = 61.0) -> Dataset:
    """A VL photo whose header declares ``megapixels`` but whose pixel data is tiny.

    Nothing of that size is allocated: a decoder that checks the header first refuses it
    for its size, one that does not would try to read gigabytes.
    """
    ds = photo_dataset(np.zeros((2, 2, 3), np.uint8), uid_seed=f"oversized-{megapixels}")
    columns = 9000
    ds.Columns = columns
    ds.Rows = int(np.ceil(megapixels * 1e6 / columns))
    return ds
