"""dermpacs results where people look: OHIF and Orthanc, in a real headless browser.

One run of the viewer per module (about a minute): a camera-like photo with a known lesion
(tests/viewer/scene.py) and its SEG, SR and overlay go into Orthanc (with its DICOMweb plugin)
by C-STORE; OHIF 3.13 is served from its prebuilt files with a same-origin proxy to Orthanc
(tests/viewer/server.py); headless Chromium, driven by playwright-core (tests/viewer/drive.mjs),
opens the study, loads the SEG, shows one segment at a time, opens the SR and the overlay, and
screenshots each. The tests below judge what it recorded: no console or page error, the segment
names, the lesion outline on the photo's lesion (compared on screen, pixel by pixel), the SR's
values, the overlay as an ordinary image.

The screenshots are kept under the test's temporary folder; with
``DERMPACS_VIEWER_SCREENSHOTS=docs/img`` the page screenshots (``viewer-*.png``) are copied
there too, which is how docs/img is refreshed.

Skipped only when a program it needs is not installed (Chromium, node/npm, Orthanc and its
DICOMweb plugin, dcmtk); ``make test`` installs them. A failed download of OHIF or
playwright-core fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from dermpacs.analysis import LESION, SKIN
from tests.viewer import scene, stack
from tests.viewer.server import ViewerServer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BROWSER_TIMEOUT_S = 240
SCREENSHOTS_ENV = "DERMPACS_VIEWER_SCREENSHOTS"
# A screen pixel counts as changed by an overlay when its R+G+B moved by more than this.
CHANGED = 40


@dataclass
class ViewerRun:
    """What the browser run recorded."""

    study: scene.ViewerStudy
    analysis_lesion_of_skin: float
    out: Path
    result: dict[str, Any]

    def shot(self, name: str) -> np.ndarray:
        """A screenshot as ``rows x columns x 3`` ``int`` (so that differences can go < 0)."""
        with Image.open(self.out / name) as image:
            return np.asarray(image.convert("RGB")).astype(np.int32)


@pytest.fixture(scope="module")
def viewer_run(tmp_path_factory: pytest.TempPathFactory) -> ViewerRun:
    missing = stack.missing_tools()
    if missing:
        pytest.skip("not installed: " + "; ".join(missing) + " (make tools installs them)")
    dist = stack.ensure_ohif()
    stack.ensure_node_modules()

    work = tmp_path_factory.mktemp("viewer")
    study = scene.build_viewer_study(work / "files")
    orthanc = stack.dicomweb_orthanc(work / "orthanc").start()
    out = work / "screens"
    try:
        scene.store_with_storescu(
            [study.photo, *study.results], orthanc.dicom_port, called_aet=orthanc.aet
        )
        stored = orthanc.series_in_study(study.study_instance_uid)
        assert len(stored) == 4, f"Orthanc holds {len(stored)} series of the study, not 4"
        (orthanc_study_id,) = orthanc.post(
            "/tools/find",
            {"Level": "Study", "Query": {"StudyInstanceUID": study.study_instance_uid}},
        )
        headers = {
            name: pydicom.dcmread(path, stop_before_pixels=True)
            for name, path in (
                ("photo", study.photo),
                ("seg", study.seg),
                ("sr", study.sr),
                ("overlay", study.overlay),
            )
        }
        with ViewerServer(dist, orthanc.url) as server:
            job = {
                "viewerUrl": server.url,
                "orthancUrl": orthanc.url,
                "orthancStudyId": orthanc_study_id,
                "studyInstanceUID": study.study_instance_uid,
                "outDir": str(out),
                "series": {name: str(ds.SeriesDescription) for name, ds in headers.items()},
                "instances": {name: str(ds.SOPInstanceUID) for name, ds in headers.items()},
                "segmentLabels": ["Skin", "Lesion"],
                "chromium": stack.CHROMIUM,
                "timeoutMs": 60000,
            }
            job_path = work / "job.json"
            job_path.write_text(json.dumps(job, indent=2))
            completed = subprocess.run(
                ["node", str(stack.VIEWER_DIR / "drive.mjs"), str(job_path)],
                cwd=stack.VIEWER_DIR,
                capture_output=True,
                text=True,
                timeout=BROWSER_TIMEOUT_S,
            )
    finally:
        orthanc.stop()

    result_path = out / "result.json"
    if not result_path.is_file():
        pytest.fail(f"the browser script wrote no result:\n{completed.stdout}{completed.stderr}")
    result = json.loads(result_path.read_text())
    if result["error"]:
        pytest.fail(
            "driving the viewer failed:\n"
            + completed.stdout
            + f"\n{result['error']}\npage text:\n{result.get('failureText', '')}\n"
            + f"screenshots in {out}"
        )
    for retry in result["retries"]:
        warnings.warn(f"the viewer needed a retry: {retry}", stacklevel=1)
    target = os.environ.get(SCREENSHOTS_ENV)
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for page_shot in sorted(out.glob("viewer-*.png")):
            shutil.copyfile(page_shot, Path(target) / page_shot.name)
    label_map = study.label_map
    lesion_of_skin = float((label_map == LESION).sum() / (label_map != 0).sum())
    return ViewerRun(study=study, analysis_lesion_of_skin=lesion_of_skin, out=out, result=result)


# --- locating the photo on screen ----------------------------------------------------------


@dataclass(frozen=True)
class ScreenImage:
    """Where the photo lies in a viewport screenshot: its edges in screen pixels."""

    top: float
    left: float
    bottom: float
    right: float

    def scale(self, rows: int, columns: int) -> tuple[float, float]:
        return (self.bottom - self.top) / rows, (self.right - self.left) / columns

    def project(self, label_map: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The label map as it should appear on a screen of ``shape`` (nearest neighbour)."""
        rows, columns = label_map.shape
        sy, sx = self.scale(rows, columns)
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
        inside = (yy >= self.top) & (yy < self.bottom) & (xx >= self.left) & (xx < self.right)
        source_row = np.clip(((yy + 0.5 - self.top) / sy).astype(int), 0, rows - 1)
        source_col = np.clip(((xx + 0.5 - self.left) / sx).astype(int), 0, columns - 1)
        return np.where(inside, label_map[source_row, source_col], 0)


def locate_photo(shot: np.ndarray, drape_rgb: np.ndarray) -> ScreenImage:
    """Find the photo in a viewport screenshot by its drape, the colour of its borders.

    The viewport's own 1-pixel frame is left out; the viewer fits the photo to the viewport,
    so two of its edges touch the frame and two border black bands.
    """
    inner = shot[1:-1, 1:-1]
    drape = np.abs(inner - drape_rgb).max(axis=2) < 30
    rows = np.nonzero(drape.sum(axis=1) >= 10)[0]
    columns = np.nonzero(drape.sum(axis=0) >= 10)[0]
    assert rows.size and columns.size, "the photo's drape is nowhere on screen"
    return ScreenImage(
        top=rows[0] + 1.0,
        left=columns[0] + 1.0,
        bottom=rows[-1] + 2.0,
        right=columns[-1] + 2.0,
    )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.array(np.nonzero(mask), dtype=float).mean(axis=1)


def drape_of(run: ViewerRun) -> np.ndarray:
    """The drape's colour as decoded from the photo (its four corners)."""
    rgb = run.study.rgb.astype(np.int32)
    corners = np.concatenate([rgb[:8, :8], rgb[:8, -8:], rgb[-8:, :8], rgb[-8:, -8:]])
    return corners.reshape(-1, 3).mean(axis=0)


# --- the tests -------------------------------------------------------------------------------


def test_no_console_or_page_errors(viewer_run: ViewerRun) -> None:
    result = viewer_run.result
    assert result["pageErrors"] == []
    assert result["consoleErrors"] == []
    assert result["failedRequests"] == []
    # Bounded, as the issue asks (about three minutes for the whole test).
    assert result["seconds"] < BROWSER_TIMEOUT_S


def test_segmentation_panel_names_both_segments(viewer_run: ViewerRun) -> None:
    assert viewer_run.result["segmentTitles"] == ["Skin", "Lesion"]


def test_photo_is_shown_as_sent(viewer_run: ViewerRun) -> None:
    shot = viewer_run.shot("raw-photo.png")
    where = locate_photo(shot, drape_of(viewer_run))
    rgb = viewer_run.study.rgb.astype(np.int32)
    sy, sx = where.scale(*rgb.shape[:2])
    assert sy == pytest.approx(sx, rel=0.01), "the photo is not shown with square pixels"
    assert _mean_abs(_on_image_grid(shot, where, rgb.shape[:2]), rgb) < 8


def test_lesion_outline_lies_on_the_lesion(viewer_run: ViewerRun) -> None:
    """The Lesion segment, drawn alone, covers the photo's lesion on screen.

    Three screenshots of the same viewport: Lesion only, and no segment. What changed
    between them is what the viewer drew for the lesion; it must coincide with (a) the red
    lesion visible in the photo itself and (b) the true lesion mask placed where the photo
    lies on screen.
    """
    run = viewer_run
    lesion_only = run.shot("raw-seg-only-lesion.png")
    bare = run.shot("raw-seg-none.png")
    where = locate_photo(bare, drape_of(run))
    rows, columns = run.study.label_map.shape
    sy, sx = where.scale(rows, columns)
    assert sy == pytest.approx(sx, rel=0.01)
    assert sx > 0.5, "the photo is shown too small to judge"

    # Showing Lesion again after hiding everything gives the very same picture.
    assert run.result["lesionOnlyRepeatable"]
    drawn = np.abs(lesion_only - bare).sum(axis=2) > CHANGED
    expected = where.project(run.study.label_map, bare.shape) == LESION
    # The lesion as the photo shows it: red-brown, far redder than the skin around it.
    red = (bare[..., 0] - bare[..., 1] > 70) & (
        where.project(np.ones_like(run.study.label_map), bare.shape) > 0
    )

    assert drawn.sum() > 0.5 * expected.sum(), "the viewer drew (almost) nothing for Lesion"
    assert iou(drawn, expected) > 0.9
    assert iou(drawn, red) > 0.9
    # Within about a screen pixel: no offset, no half-pixel shift of the whole mask.
    assert np.abs(centroid(drawn) - centroid(expected)).max() < 1.5
    assert np.abs(centroid(drawn) - centroid(red)).max() < 1.5
    # The measure tells a misplaced overlay apart: the same mask mirrored scores nothing.
    assert iou(drawn, np.fliplr(expected)) < 0.2
    assert iou(drawn, np.flipud(expected)) < 0.2


def test_both_segments_cover_skin_and_lesion(viewer_run: ViewerRun) -> None:
    run = viewer_run
    everything = run.shot("raw-seg-all.png")
    bare = run.shot("raw-seg-none.png")
    where = locate_photo(bare, drape_of(run))
    drawn = np.abs(everything - bare).sum(axis=2) > CHANGED
    expected = np.isin(where.project(run.study.label_map, bare.shape), (SKIN, LESION))
    assert iou(drawn, expected) > 0.95
    # Nothing drawn outside the photo.
    inside = where.project(np.ones_like(run.study.label_map), bare.shape) > 0
    assert (drawn & ~inside).sum() == 0


def test_sr_opens_and_shows_the_reports_values(viewer_run: ViewerRun) -> None:
    """OHIF's SR view shows the report's values next to their regions; tracking works."""
    text = viewer_run.result["srViewportText"]
    lesion_of_skin = 100 * viewer_run.analysis_lesion_of_skin
    assert f"Lesion area fraction of skin: {lesion_of_skin:.2f} %" in text
    assert "Probability: 0.64" in text  # the top finding's probability (scene.py)
    assert "Individual typology angle: 38.50 deg" in text
    # Accepting OHIF's offer to track turns the SR's regions into measurements.
    tracked = viewer_run.result["trackedMeasurements"]
    assert "Lesion" in tracked and "Skin" in tracked


def test_overlay_opens_as_an_ordinary_image(viewer_run: ViewerRun) -> None:
    """The burned-in overlay shows as a plain picture: outlines, crop boxes and legend."""
    run = viewer_run
    shot = run.shot("raw-overlay.png")
    overlay = pydicom.dcmread(run.study.overlay).pixel_array.astype(np.int32)
    where = locate_photo(shot, drape_of(run))
    sy, sx = where.scale(*overlay.shape[:2])
    assert sy == pytest.approx(sx, rel=0.01)
    screen = _on_image_grid(shot, where, overlay.shape[:2])
    photo = _on_image_grid_of(run.study.rgb, overlay.shape[:2])
    assert _mean_abs(screen, overlay) < 8
    # Where the overlay drew something (outlines, boxes, legend), the screen shows the
    # drawing, not the bare photo.
    drawn = np.abs(overlay - photo).sum(axis=2) > 150
    assert drawn.sum() > 1000
    to_overlay, to_photo = _mean_abs(screen, overlay, drawn), _mean_abs(screen, photo, drawn)
    assert to_overlay < 25
    assert to_photo > 2.5 * to_overlay


def test_screenshots_for_the_docs_were_taken(viewer_run: ViewerRun) -> None:
    for name in ("photo", "seg", "sr", "sr-tracked", "overlay", "orthanc"):
        with Image.open(viewer_run.out / f"viewer-{name}.png") as image:
            assert image.size == (1400, 900)


def _on_image_grid(shot: np.ndarray, where: ScreenImage, shape: tuple[int, ...]) -> np.ndarray:
    """The screen's photo area resampled to an image of ``shape`` (rows, columns)."""
    top, left = int(round(where.top)), int(round(where.left))
    bottom, right = int(round(where.bottom)), int(round(where.right))
    return _on_image_grid_of(shot[top:bottom, left:right], shape)


def _on_image_grid_of(picture: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    image = Image.fromarray(np.asarray(picture, dtype=np.uint8))
    resized = image.resize((shape[1], shape[0]), Image.Resampling.BOX)
    return np.asarray(resized).astype(np.int32)


def _mean_abs(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """Mean absolute difference, without a 3-pixel band along the edges (interpolation)."""
    band = np.zeros(a.shape[:2], dtype=bool)
    band[3:-3, 3:-3] = True
    if where is not None:
        band &= where
    return float(np.abs(a - b)[band].mean())
