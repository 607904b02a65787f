"""The admin page in a real headless Chromium, on a job that went through the real service.

``dermpacs serve`` (listener and worker, embedded broker) takes a camera photo sent by dcmtk
``storescu``; its destination is an Orthanc that is not running yet, so the delivery fails
and the job fails. Then ``dermpacs admin`` starts, Orthanc starts, and Chromium (Debian
``chromium`` driven by npm ``playwright-core``, tests/admin_browser/admin_flow.cjs) is refused
without credentials, signs in, sees the failed job, retries it from the failed list, and
watches it get delivered; it C-ECHOes the PACS and reads the configuration. Orthanc must then
hold the results, and the job's audit trail must name the admin who retried it.

Screenshots are written to ``$DERMPACS_ADMIN_SCREENSHOTS`` (``docs/img`` refreshes the ones
the documentation shows), else to the test's temporary folder. playwright-core is installed by
``npm ci`` from tests/admin_browser/package-lock.json into ``~/.cache/dermpacs-admin-browser``
(``$DERMPACS_ADMIN_BROWSER_CACHE``), outside the repository; npm's own cache makes it offline
after the first time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dermpacs.jobs.models import JobState
from dermpacs.jobs.store import JobStore
from tests import services
from tests.photos import make_img2dcm_photo, skin_photo_rgb
from tests.test_admin_support import BOSS, BOSS_HASH, READ_TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BROWSER_DIR = Path(__file__).resolve().parent / "admin_browser"
CHROMIUM = os.environ.get("DERMPACS_CHROMIUM", "/usr/bin/chromium")


def node_modules() -> Path:
    """playwright-core from the lock file, installed outside the repository."""
    cache = Path(
        os.environ.get(
            "DERMPACS_ADMIN_BROWSER_CACHE", Path.home() / ".cache" / "dermpacs-admin-browser"
        )
    )
    cache.mkdir(parents=True, exist_ok=True)
    lock = (BROWSER_DIR / "package-lock.json").read_bytes()
    installed = cache / "node_modules" / "playwright-core" / "package.json"
    if not installed.exists() or (cache / "package-lock.json").read_bytes() != lock:
        shutil.copy(BROWSER_DIR / "package.json", cache / "package.json")
        (cache / "package-lock.json").write_bytes(lock)
        done = subprocess.run(
            ["npm", "ci", "--prefer-offline", "--no-audit", "--no-fund"],
            cwd=cache,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            pytest.fail(f"npm ci in {cache} failed: {done.stderr.strip()}")
    return cache / "node_modules"


def config_text(tmp_path: Path, *, listener_port: int, admin_port: int, pacs_port: int) -> str:
    # Small untrained plumbing networks whatever weights ship: this test is about the admin
    # page, every stage still runs (the findings mean nothing), and it stays fast on a CPU.
    model = services.write_plumbing_weights(tmp_path / "plumbing-weights")
    model_lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in model.items())
    return f"""
[listener]
ae_title = "DERMPACS"
host = "127.0.0.1"
port = {listener_port}

[storage]
root = "{tmp_path / "var"}"

[model]
{model_lines}

[queues.dispatch]
name = "dispatch"
max_attempts = 1

[admin]
host = "127.0.0.1"
port = {admin_port}
echo_timeout = 3.0

[[admin.users]]
name = "{BOSS[0]}"
password = "{BOSS_HASH}"
role = "admin"

[[admin.tokens]]
name = "prometheus"
token = "{READ_TOKEN}"
role = "read"

[[destinations]]
name = "pacs"
kind = "dicom"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs_port}
"""


def test_admin_retries_a_failed_job_in_chromium(tmp_path: Path) -> None:
    for tool in (CHROMIUM, "node", "npm", "storescu", "img2dcm", "Orthanc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    modules = node_modules()
    screenshots = Path(os.environ.get("DERMPACS_ADMIN_SCREENSHOTS", tmp_path / "screenshots"))
    screenshots.mkdir(parents=True, exist_ok=True)

    orthanc = services.Orthanc(tmp_path / "orthanc")  # ports chosen, not started yet
    listener_port, admin_port = services.free_port(), services.free_port()
    config = tmp_path / "dermpacs.toml"
    config.write_text(
        config_text(
            tmp_path,
            listener_port=listener_port,
            admin_port=admin_port,
            pacs_port=orthanc.dicom_port,
        )
    )
    from dermpacs.config import load_settings

    settings = load_settings(config)
    processes: list[services.ServiceProcess] = []
    store = JobStore.from_settings(settings)
    try:
        serve = services.dermpacs_process("serve", config, log_path=tmp_path / "serve.log")
        processes.append(serve)
        services.wait_until(
            lambda: services.c_echo(listener_port, called_aet="DERMPACS"),
            timeout=90,
            what="the listener",
        )
        photo = make_img2dcm_photo(tmp_path / "camera", skin_photo_rgb(240, 320, seed=7))
        sent = services.storescu(listener_port, [photo])
        assert sent.returncode == 0, sent.stderr
        study = str(dcmread(photo, stop_before_pixels=True).StudyInstanceUID)

        def failed_job() -> Any:
            jobs = store.list_jobs(states=[JobState.FAILED])
            return jobs[0] if jobs else None

        try:
            job = services.wait_until(failed_job, timeout=240, interval=0.5, what="a failed job")
        except TimeoutError:
            pytest.fail(f"the job did not fail as expected\n{serve.log()[-4000:]}")
        assert "association" in (job.last_error or "")

        admin = services.dermpacs_process("admin", config, log_path=tmp_path / "admin.log")
        processes.append(admin)
        services.wait_until(
            lambda: services.port_open(admin_port), timeout=60, what="the admin page"
        )
        orthanc.start()  # the PACS is back: the retry can succeed

        done = subprocess.run(
            ["node", str(BROWSER_DIR / "admin_flow.cjs")],
            env={
                **os.environ,
                "BASE_URL": f"http://127.0.0.1:{admin_port}",
                "ADMIN_USER": BOSS[0],
                "ADMIN_PASSWORD": BOSS[1],
                "JOB_ID": str(job.id),
                "DESTINATION": "pacs",
                "OUT_DIR": str(screenshots),
                "NODE_MODULES": str(modules),
                "CHROMIUM": CHROMIUM,
            },
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{done.stderr}\n--- admin ---\n{admin.log()[-3000:]}"
        seen = json.loads(done.stdout.strip().splitlines()[-1])

        assert seen["anonymousStatus"] == 401 and seen["challenge"].startswith("Basic")
        assert seen["overviewStatus"] == 200
        assert seen["overviewJobState"] == "failed"
        assert seen["listener"] == "answering"
        assert seen["signedInAs"] == "boss · admin"
        assert "association" in seen["failedReason"]
        assert seen["afterRetryUrl"] == f"/jobs/{job.id}?notice=dispatch"
        assert "delivered again" in seen["notice"]
        assert seen["finalState"] == "delivered", seen
        assert max(seen["overlaySize"]) == 320  # the overlay, at the photo's size
        retried = [row for row in seen["audit"] if row[3] == "admin:boss"]
        assert retried and retried[0][2] == "results ready" and retried[0][4] == "retried"
        assert seen["audit"][-1][2] == "delivered"
        assert "success" in seen["echo"] and f":{orthanc.dicom_port}" in seen["echo"]
        assert READ_TOKEN not in seen["config"] and BOSS_HASH not in seen["config"]
        assert '"token": "********"' in seen["config"]

        # What the browser saw is what happened.
        detail = store.get(job.id)
        assert detail.job.state is JobState.DELIVERED
        assert any(e.actor == "admin:boss" and e.reason == "retried" for e in detail.events)
        stored = {s["MainDicomTags"].get("Modality") for s in orthanc.series_in_study(study)}
        assert {"SEG", "SR"} <= stored and len(orthanc.instances_in_study(study)) == 3
        for name in ("overview", "failed", "job", "destinations", "config"):
            png = screenshots / f"admin-{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    finally:
        for process in reversed(processes):
            process.stop()
        orthanc.stop()
        store.dispose()
