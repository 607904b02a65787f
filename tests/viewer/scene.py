"""The viewer test's study: a camera-like photo with a known lesion and its dermpacs results.

The photo is drawn here, so its label map is exact: a skin-coloured limb on a blue drape with
one red-brown lesion placed off-centre (upper right), so that a flipped, transposed or shifted
overlay cannot pass for an aligned one. It is JPEG-encoded and wrapped by dcmtk ``img2dcm
-vlp`` as a clinic camera would send it, decoded again with dermpacs' own reader, and turned
into SEG, SR and overlay with :func:`dermpacs.imaging.results.build_results` from a
hand-made :class:`~dermpacs.analysis.PhotoAnalysis` whose label map is that true mask. No
model is involved: the test is about what the viewer shows, not what the network finds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from dermpacs.analysis import BACKGROUND, LESION, SKIN, Crop, PhotoAnalysis
from dermpacs.imaging.decode import read_photograph_bytes
from dermpacs.imaging.results import build_results

ROWS, COLUMNS = 480, 640
CLASS_NAMES = ("atopic_dermatitis", "mycosis_fungoides", "impetigo", "herpesvirus_infection")
ALGORITHM_VERSION = "viewer-test-0"
CONTENT_DATETIME = datetime(2024, 5, 1, 12, 30, 15)

# The lesion's ellipse in fractions of the photo (centre column, centre row, semi-axes):
# upper right of centre, so that any flip or transposition moves it well away.
LESION_U, LESION_V, LESION_RU, LESION_RV = 0.66, 0.36, 0.10, 0.12
DRAPE_RGB = (52, 78, 150)


def lesion_photo(rows: int = ROWS, columns: int = COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """Draw the photo and its exact label map.

    Returns
    -------
    rgb : numpy.ndarray
        ``rows x columns x 3`` ``uint8``.
    label_map : numpy.ndarray
        ``rows x columns`` ``uint8`` with BACKGROUND, SKIN and LESION.
    """
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float64)
    u = (x + 0.5) / columns
    v = (y + 0.5) / rows
    skin = ((u - 0.5) / 0.44) ** 2 + ((v - 0.52) / 0.40) ** 2 <= 1.0
    radius = np.sqrt(((u - LESION_U) / LESION_RU) ** 2 + ((v - LESION_V) / LESION_RV) ** 2)
    lesion = (radius <= 1.0) & skin
    label_map = np.full((rows, columns), BACKGROUND, dtype=np.uint8)
    label_map[skin] = SKIN
    label_map[lesion] = LESION

    rng = np.random.default_rng(8)
    rgb = np.empty((rows, columns, 3), dtype=np.float64)
    rgb[...] = DRAPE_RGB
    shading = 0.85 + 0.15 * np.cos(np.clip((v - 0.52) / 0.40, -1, 1) * np.pi / 2)
    rgb[skin] = (np.array([226.0, 180.0, 152.0]) * shading[..., None])[skin]
    core = np.clip(1.0 - radius, 0, 1)[..., None]
    rgb[lesion] = (np.array([182.0, 78.0, 70.0]) - 50.0 * core * np.array([1, 0.6, 0.5]))[lesion]
    rgb += rng.normal(0.0, 3.0, size=rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), label_map


def hand_made_analysis(label_map: np.ndarray) -> PhotoAnalysis:
    """A consistent PhotoAnalysis of ``label_map`` as the method would report it.

    Values are computed from the mask; the probabilities are made up (and say so nowhere
    else than here: this is test data), with two crops around the lesion.
    """
    rows, columns = label_map.shape
    skin = label_map != BACKGROUND
    lesion = label_map == LESION
    probabilities = {
        "atopic_dermatitis": 0.64,
        "mycosis_fungoides": 0.18,
        "impetigo": 0.11,
        "herpesvirus_infection": 0.07,
    }
    lesion_rows, lesion_columns = np.nonzero(lesion)
    centre_row, centre_column = int(lesion_rows.mean()), int(lesion_columns.mean())
    side = rows // 3

    def crop(row0: int, col0: int) -> Crop:
        box = (row0, col0, row0 + side, col0 + side)
        window = (slice(box[0], box[2]), slice(box[1], box[3]))
        return Crop(
            box=box,
            skin_fraction=float(skin[window].mean()),
            lesion_fraction=float(lesion[window].mean()),
            probabilities=probabilities,
        )

    crops = (
        crop(max(centre_row - side // 2, 0), max(centre_column - side // 2 - side // 4, 0)),
        crop(max(centre_row - side // 2 + side // 5, 0), min(centre_column, columns - side)),
    )
    return PhotoAnalysis(
        label_map=label_map,
        skin_fraction=float(skin.mean()),
        lesion_fraction=float(lesion.mean()),
        lesion_fraction_of_skin=float(lesion.sum() / skin.sum()),
        crops=crops,
        probabilities=probabilities,
        finding="atopic_dermatitis",
        atopic_dermatitis_probability=probabilities["atopic_dermatitis"],
        ita_degrees=38.5,
        ita_category="intermediate",
        model_version=ALGORITHM_VERSION,
    )


def camera_photo(folder: Path, rgb: np.ndarray) -> Path:
    """Wrap a JPEG of ``rgb`` with dcmtk ``img2dcm -vlp``: what a clinic camera sends.

    The patient fields are set so that the study is recognisable in the viewers' lists; the
    names are made up.
    """
    img2dcm = shutil.which("img2dcm")
    if img2dcm is None:
        raise RuntimeError("img2dcm (Debian package dcmtk) is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = folder / "photo.jpg"
    Image.fromarray(rgb).save(jpeg, format="JPEG", quality=92)
    target = folder / "photo.dcm"
    keys = {
        "PatientName": "Viewer^Demo",
        "PatientID": "DERMPACS-VIEWER-1",
        "StudyDescription": "Dermatology photo (dermpacs viewer test)",
        "SeriesDescription": "Clinical photograph",
        "StudyID": "1",
        "AccessionNumber": "VIEWER1",
        "StudyDate": "20240501",
        "StudyTime": "101500",
        "SeriesNumber": "1",
    }
    command = [img2dcm, "-vlp", str(jpeg), str(target)]
    for key, value in keys.items():
        command += ["-k", f"{key}={value}"]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return target


@dataclass(frozen=True)
class ViewerStudy:
    """The files of the viewer study and what is known about them."""

    photo: Path
    seg: Path
    sr: Path
    overlay: Path
    study_instance_uid: str
    photo_series_uid: str
    seg_series_uid: str
    sr_series_uid: str
    overlay_series_uid: str
    label_map: np.ndarray
    rgb: np.ndarray

    @property
    def results(self) -> list[Path]:
        """SEG, SR and overlay files."""
        return [self.seg, self.sr, self.overlay]

    def describe(self) -> dict[str, object]:
        """What the browser script needs, as JSON-ready values."""
        rows, columns = self.label_map.shape
        return {
            "studyInstanceUID": self.study_instance_uid,
            "photoSeriesUID": self.photo_series_uid,
            "segSeriesUID": self.seg_series_uid,
            "srSeriesUID": self.sr_series_uid,
            "overlaySeriesUID": self.overlay_series_uid,
            "rows": rows,
            "columns": columns,
            "segmentLabels": ["Skin", "Lesion"],
        }


def build_viewer_study(folder: Path) -> ViewerStudy:
    """Write the photo and its SEG, SR and overlay under ``folder``."""
    from pydicom import dcmread

    rgb, label_map = lesion_photo()
    photo_path = camera_photo(folder, rgb)
    photograph = read_photograph_bytes(photo_path)
    source = dcmread(photo_path)
    results = build_results(
        source,
        np.asarray(photograph.rgb),
        hand_made_analysis(label_map),
        algorithm_version=ALGORITHM_VERSION,
        class_names=CLASS_NAMES,
        content_datetime=CONTENT_DATETIME,
    )
    paths = {}
    for name, dataset in results.as_dict().items():
        paths[name] = folder / f"{name}.dcm"
        dataset.save_as(paths[name], enforce_file_format=True)
    study = ViewerStudy(
        photo=photo_path,
        seg=paths["seg"],
        sr=paths["sr"],
        overlay=paths["overlay"],
        study_instance_uid=str(source.StudyInstanceUID),
        photo_series_uid=str(source.SeriesInstanceUID),
        seg_series_uid=str(results.seg.SeriesInstanceUID),
        sr_series_uid=str(results.sr.SeriesInstanceUID),
        overlay_series_uid=str(results.overlay.SeriesInstanceUID),
        label_map=label_map,
        rgb=np.asarray(photograph.rgb),
    )
    (folder / "study.json").write_text(json.dumps(study.describe(), indent=2))
    return study


def seg_label_map(seg: Dataset) -> np.ndarray:
    """The label map a dermpacs SEG encodes (Skin = skin or lesion, Lesion = lesion).

    Read from the SEG's frames and their Referenced Segment Numbers, so that the viewer's
    drawing is compared with what the SEG says, whatever made it.
    """
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    masks = {label: np.zeros(frames.shape[1:], dtype=bool) for label in labels.values()}
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        masks[labels[number]] |= frame.astype(bool)
    label_map = np.full(frames.shape[1:], BACKGROUND, dtype=np.uint8)
    label_map[masks["Skin"]] = SKIN
    label_map[masks["Lesion"]] = LESION
    return label_map


def store_with_storescu(files: list[Path], port: int, *, called_aet: str) -> None:
    """C-STORE ``files`` to ``127.0.0.1:port`` with dcmtk ``storescu``.

    One call per transfer syntax kind (FIELD-NOTES): ``-xy`` for the JPEG baseline photo,
    the default for uncompressed objects; ``-R`` proposes only the SOP classes the files need
    (SEG is not in storescu's fixed list).
    """
    from pydicom import dcmread

    storescu = shutil.which("storescu")
    if storescu is None:
        raise RuntimeError("storescu (Debian package dcmtk) is not installed")
    jpeg = [
        f
        for f in files
        if dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
        == "1.2.840.10008.1.2.4.50"
    ]
    native = [f for f in files if f not in jpeg]
    for group, options in ((jpeg, ["-xy"]), (native, [])):
        if not group:
            continue
        completed = subprocess.run(
            [
                storescu,
                "-R",
                *options,
                "-aec",
                called_aet,
                "127.0.0.1",
                str(port),
                *map(str, group),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        )
        if completed.returncode != 0:
            raise RuntimeError(f"storescu failed: {completed.stdout}{completed.stderr}")
