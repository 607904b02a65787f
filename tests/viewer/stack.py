"""What the viewer test stands on: the OHIF build, playwright-core, Chromium, Orthanc + DICOMweb.

Downloads happen once and are kept between runs: the ``@ohif/app`` package (its prebuilt
``dist/``) is fetched with ``npm pack`` into ``~/.cache/dermpacs-viewer`` (or
``$DERMPACS_VIEWER_CACHE``) and checked against the integrity pinned in
``tests/viewer/package.json``; playwright-core is installed into ``tests/viewer/node_modules``
by ``npm ci`` from the lock file, which reuses npm's own cache. Nothing is downloaded while a
test talks to the viewer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tests import services

VIEWER_DIR = Path(__file__).resolve().parent
PACKAGE_JSON = VIEWER_DIR / "package.json"
CHROMIUM = "/usr/bin/chromium"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class ViewerSetupError(RuntimeError):
    """The viewer's parts could not be prepared (download, integrity, install)."""


def cache_dir() -> Path:
    """Where downloads are kept between runs."""
    default = Path.home() / ".cache" / "dermpacs-viewer"
    return Path(os.environ.get("DERMPACS_VIEWER_CACHE", default))


def ohif_pin() -> dict[str, str]:
    """The pinned OHIF package: ``{"package", "version", "integrity"}``."""
    return dict(json.loads(PACKAGE_JSON.read_text())["ohif"])


def missing_tools() -> list[str]:
    """The programs the browser test needs that are not installed (empty when all are)."""
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"chromium ({CHROMIUM}; Debian package chromium)")
    for tool, package in (("node", "nodejs"), ("npm", "npm"), ("Orthanc", "orthanc")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (Debian package {package})")
    if not DICOMWEB_PLUGIN.is_file():
        missing.append(f"Orthanc's DICOMweb plugin ({DICOMWEB_PLUGIN}; orthanc-dicomweb)")
    for tool in ("img2dcm", "storescu"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (Debian package dcmtk)")
    return missing


def _sri(data_path: Path) -> str:
    digest = hashlib.sha512()
    with data_path.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def ensure_ohif() -> Path:
    """Return OHIF's prebuilt ``dist/`` folder, downloading the pinned package once.

    Raises
    ------
    ViewerSetupError
        When ``npm pack`` fails or the tarball's integrity differs from the pinned one.
    """
    pin = ohif_pin()
    root = cache_dir() / f"ohif-app-{pin['version']}"
    dist = root / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        spec = f"{pin['package']}@{pin['version']}"
        packed = subprocess.run(
            ["npm", "pack", spec, "--json", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if packed.returncode != 0:
            raise ViewerSetupError(f"npm pack {spec} failed: {packed.stderr.strip()}")
        (tarball,) = Path(tmp).glob("*.tgz")
        integrity = _sri(tarball)
        if integrity != pin["integrity"]:
            raise ViewerSetupError(
                f"{spec}: integrity {integrity} differs from the pinned {pin['integrity']}"
            )
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarball) as archive:
            archive.extractall(unpacked, filter="data")
        if not (unpacked / "package" / "dist" / "index.html").is_file():
            raise ViewerSetupError(f"{spec} holds no prebuilt dist/index.html")
        shutil.rmtree(root, ignore_errors=True)
        unpacked.rename(root)
    return dist


def ensure_node_modules() -> Path:
    """Install playwright-core from the lock file unless the pinned version is there.

    Returns the ``node_modules`` folder.
    """
    wanted = json.loads(PACKAGE_JSON.read_text())["dependencies"]["playwright-core"]
    installed = VIEWER_DIR / "node_modules" / "playwright-core" / "package.json"
    if installed.is_file() and json.loads(installed.read_text())["version"] == wanted:
        return installed.parents[1]
    completed = subprocess.run(
        ["npm", "ci", "--prefer-offline", "--no-audit", "--no-fund"],
        cwd=VIEWER_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if completed.returncode != 0:
        raise ViewerSetupError(f"npm ci in {VIEWER_DIR} failed: {completed.stderr.strip()}")
    return installed.parents[1]


def dicomweb_orthanc(workdir: Path) -> services.Orthanc:
    """An Orthanc on loopback (tests/services.py) with its DICOMweb plugin enabled; not started.

    The plugin serves QIDO-RS/WADO-RS under ``/dicom-web/``; OHIF reads the study there.
    """
    orthanc = services.Orthanc(workdir)
    config = json.loads(orthanc.config_path.read_text())
    config["Plugins"] = [str(DICOMWEB_PLUGIN)]
    config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}
    orthanc.config_path.write_text(json.dumps(config, indent=2))
    return orthanc
