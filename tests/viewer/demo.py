"""``make viewer-demo``: the viewer test's study in Orthanc and OHIF, for a person to look at.

Builds the same photo and results as ``tests/test_viewer.py`` (tests/viewer/scene.py), starts
Orthanc with DICOMweb on loopback (storage under ``var/viewer-demo``), stores the study with
``storescu`` and serves OHIF with a same-origin proxy to Orthanc. Prints both addresses and
waits until Ctrl-C, then stops Orthanc (by PID).

Run from the repository root::

    .venv/bin/python -m tests.viewer.demo [--port 3000] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.viewer import scene, stack  # noqa: E402
from tests.viewer.server import ViewerServer  # noqa: E402


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description="OHIF + Orthanc with the viewer test study")
    parser.add_argument("--port", type=int, default=3000, help="the viewer's port (loopback)")
    parser.add_argument("--workdir", type=Path, default=REPO / "var" / "viewer-demo")
    parser.add_argument(
        "--exit-after", type=float, default=None, help="stop after this many seconds (checks)"
    )
    args = parser.parse_args()

    # SIGTERM (a service manager, `kill`) stops it as Ctrl-C does, so Orthanc is stopped too.
    signal.signal(signal.SIGTERM, _interrupt)
    missing = [m for m in stack.missing_tools() if not m.startswith("chromium")]
    if missing:
        print("missing: " + "; ".join(missing) + " (make tools)", file=sys.stderr)
        return 2
    dist = stack.ensure_ohif()
    shutil.rmtree(args.workdir, ignore_errors=True)
    study = scene.build_viewer_study(args.workdir / "files")
    orthanc = stack.dicomweb_orthanc(args.workdir / "orthanc").start()
    try:
        scene.store_with_storescu(
            [study.photo, *study.results], orthanc.dicom_port, called_aet=orthanc.aet
        )
        with ViewerServer(dist, orthanc.url, port=args.port) as server:
            viewer = f"{server.url}/viewer?StudyInstanceUIDs={study.study_instance_uid}"
            print(f"Orthanc (its own UI, Orthanc Explorer): {orthanc.url}/app/explorer.html")
            print(f"OHIF study list:  {server.url}/")
            print(f"OHIF this study:  {viewer}")
            print(f"DICOM files:      {study.photo.parent}")
            print("Ctrl-C stops Orthanc and the viewer.", flush=True)
            deadline = None if args.exit_after is None else time.monotonic() + args.exit_after
            try:
                while deadline is None or time.monotonic() < deadline:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
    finally:
        # A second Ctrl-C or SIGTERM must not cut the shutdown short and orphan Orthanc.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        orthanc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
