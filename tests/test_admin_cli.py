"""``dermpacs queues``, ``dermpacs destinations`` and ``dermpacs admin`` as an admin runs them.

The first two run in-process through ``dermpacs.cli.main`` on a configuration file; ``dermpacs
admin`` runs as a real process (uvicorn) and is asked over HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from dermpacs.admin.auth import verify_password
from dermpacs.cli import main
from dermpacs.jobs.models import JobState
from dermpacs.jobs.store import JobStore
from tests import services
from tests.test_admin_support import (
    ADMIN_TOKEN,
    BOSS,
    BOSS_HASH,
    READ_TOKEN,
    populate_jobs,
    use_broker,
)


def write_config(tmp_path: Path, *, pacs_port: int, admin_port: int = 8080) -> Path:
    """A configuration file: SQLite job store, embedded broker, folder and DICOM destinations."""
    root = tmp_path / "storage"
    text = f"""
[storage]
root = "{root}"

[listener]
port = {services.free_port()}

[admin]
host = "127.0.0.1"
port = {admin_port}
echo_timeout = 2.0

[[admin.users]]
name = "{BOSS[0]}"
password = "{BOSS_HASH}"
role = "admin"

[[admin.tokens]]
name = "prometheus"
token = "{READ_TOKEN}"
role = "read"

[[destinations]]
name = "outbox"
kind = "folder"
path = "outbox"

[[destinations]]
name = "pacs"
kind = "dicom"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
"""
    path = tmp_path / "dermpacs.toml"
    path.write_text(text)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


@pytest.fixture
def populated(tmp_path: Path):
    from dermpacs.config import load_settings

    config = write_config(tmp_path, pacs_port=services.free_port())
    settings = load_settings(config)
    use_broker(settings)
    store = JobStore.from_settings(settings)
    jobs = populate_jobs(store, Path(settings.storage.root))
    store.dispose()
    return config, settings, jobs


def test_queues_json_and_table(populated, capsys: pytest.CaptureFixture[str]) -> None:
    from workers.app import publish_processing

    config, _settings, jobs = populated
    publish_processing(jobs.received)
    code, out = run_cli(capsys, "queues", "--config", str(config), "--json")
    assert code == 0
    queues = {q["stage"]: q for q in json.loads(out)}
    assert queues["inference"]["name"] == "inference"
    assert queues["inference"]["broker_depth"] == 1
    assert queues["inference"]["waiting_jobs"] == 2
    assert queues["inference"]["consumers"] is None
    assert queues["dispatch"]["waiting_jobs"] == 1
    assert queues["dispatch"]["broker_depth"] == 0
    code, out = run_cli(capsys, "queues", "--config", str(config))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["queue", "stage", "broker"]
    assert lines[1].split()[:5] == ["inference", "inference", "1", "-", "2"]
    assert lines[2].split()[:5] == ["dispatch", "dispatch", "0", "-", "1"]


def test_jobs_cancel_list_and_retry(populated, capsys: pytest.CaptureFixture[str]) -> None:
    import getpass

    config, settings, jobs = populated
    code, out = run_cli(
        capsys,
        "jobs",
        "--config",
        str(config),
        "cancel",
        str(jobs.queued),
        str(jobs.results_ready),
        "--reason",
        "duplicate study",
        "--json",
    )
    assert code == 0, out
    assert json.loads(out) == [
        {"job_id": jobs.queued, "cancelled": True},
        {"job_id": jobs.results_ready, "cancelled": True},
    ]
    store = JobStore.from_settings(settings)
    try:
        last = store.get(jobs.queued).events[-1]
        assert (last.to_state, last.reason) == (JobState.CANCELLED, "cancelled: duplicate study")
        assert last.actor == f"admin@cli:{getpass.getuser()}"
    finally:
        store.dispose()
    # finished jobs are refused, each with its reason, and the command fails
    code, out = run_cli(
        capsys,
        "jobs",
        "--config",
        str(config),
        "cancel",
        str(jobs.delivered),
        str(jobs.failed_processing),
        str(jobs.queued),
        "999",
    )
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == (
        f"job {jobs.delivered}: job {jobs.delivered} is delivered: only a job that is received, "
        "queued, processing, results_ready can be cancelled"
    )
    assert f"job {jobs.failed_processing} is failed" in lines[1]
    assert f"job {jobs.queued} is cancelled" in lines[2]
    assert lines[3] == "job 999: no job 999"
    code, out = run_cli(
        capsys, "jobs", "--config", str(config), "list", "--state", "cancelled", "--json"
    )
    assert code == 0
    assert sorted(j["id"] for j in json.loads(out)) == sorted(
        [jobs.queued, jobs.results_ready, jobs.cancelled]
    )
    # retry undoes a cancel: processing again, or delivery where the results exist
    code, out = run_cli(
        capsys,
        "jobs",
        "--config",
        str(config),
        "retry",
        str(jobs.queued),
        str(jobs.results_ready),
        "--json",
    )
    assert code == 0, out
    stages = {r["job_id"]: r["stage"] for r in json.loads(out)}
    assert stages == {jobs.queued: "processing", jobs.results_ready: "dispatch"}


def test_queues_reports_a_broker_that_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, pacs_port=services.free_port())
    monkeypatch.setenv("DERMPACS__BROKER__URL", f"redis://127.0.0.1:{services.free_port()}/0")
    code, out = run_cli(capsys, "queues", "--config", str(config), "--json")
    assert code == 1
    statuses = json.loads(out)
    assert all(s["broker_depth"] is None and s["broker_error"] for s in statuses)


def test_destinations_test_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    scp = AE(ae_title="PACS")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False)
    try:
        config = write_config(tmp_path, pacs_port=server.server_address[1])
        code, out = run_cli(capsys, "destinations", "test", "--config", str(config), "--json")
        assert code == 0, out
        checks = {c["name"]: c for c in json.loads(out)}
        assert checks["pacs"]["ok"] and checks["pacs"]["status"] == 0
        assert checks["pacs"]["address"].startswith("PACS@127.0.0.1:")
        assert checks["outbox"]["ok"] and checks["outbox"]["kind"] == "folder"
    finally:
        server.shutdown()
    # the PACS is gone: the command fails and says which destination
    code, out = run_cli(capsys, "destinations", "test", "pacs", "--config", str(config))
    assert code == 1
    assert out.startswith("pacs") and "FAIL" in out and "no answer" in out
    code, out = run_cli(capsys, "destinations", "test", "nowhere", "--config", str(config))
    assert code == 2 and "no destination 'nowhere'" in out


def test_destinations_test_over_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_admin import start_tls_scp

    tls = services.TlsFiles(tmp_path / "tls")
    server = start_tls_scp(tls)
    try:
        config = write_config(tmp_path, pacs_port=server.server_address[1])
        code, out = run_cli(capsys, "destinations", "test", "pacs", "--config", str(config))
        assert code == 1 and "FAIL" in out  # plain DICOM to a TLS-only peer
        with config.open("a") as handle:  # the [[destinations]] "pacs" table is the last one
            handle.write(
                f'tls = true\ntls_ca_certificates = "{tls.ca}"\n'
                f'tls_certificate = "{tls.client_certificate}"\n'
                f'tls_private_key = "{tls.client_key}"\n'
            )
        code, out = run_cli(
            capsys, "destinations", "test", "pacs", "--config", str(config), "--json"
        )
        assert code == 0, out
        (check,) = json.loads(out)
        assert check["ok"] and check["status"] == 0
        assert check["address"] == f"PACS@127.0.0.1:{server.server_address[1]} (TLS)"
    finally:
        server.shutdown()


def test_destinations_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, pacs_port=4242)
    code, out = run_cli(capsys, "destinations", "list", "--config", str(config), "--json")
    assert code == 0
    assert [d["name"] for d in json.loads(out)] == ["outbox", "pacs"]
    code, out = run_cli(capsys, "destinations", "list", "--config", str(config))
    assert "PACS@127.0.0.1:4242" in out


def test_admin_hash_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("a long passphrase\n"))
    code, out = run_cli(capsys, "admin", "--hash-password")
    assert code == 0
    assert verify_password("a long passphrase", out.strip())


def test_admin_refuses_to_start_without_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bare.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path / "storage"}"\n')
    code = main(["admin", "--config", str(config)])
    assert code == 2
    assert "no [[admin.users]] or [[admin.tokens]]" in capsys.readouterr().err


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.integration
def test_dermpacs_admin_serves_pages_metrics_and_probes(tmp_path: Path) -> None:
    port = services.free_port()
    config = write_config(tmp_path, pacs_port=services.free_port(), admin_port=port)
    process = services.dermpacs_process("admin", config, log_path=tmp_path / "admin.log")
    base = f"http://127.0.0.1:{port}"
    try:
        status: Any = services.wait_until(
            lambda: _get(f"{base}/healthz")[0] == 200, timeout=60, what="dermpacs admin"
        )
        assert status
        assert _get(f"{base}/readyz") == (
            200,
            json.dumps(
                {"ready": True, "checks": {"job_store": "ok", "broker": "ok"}},
                separators=(",", ":"),
            ),
        )
        assert _get(f"{base}/")[0] == 401
        code, metrics = _get(f"{base}/metrics", {"Authorization": f"Bearer {READ_TOKEN}"})
        assert code == 200 and "dermpacs_photos_received_total 0.0" in metrics
        token = base64.b64encode(f"{BOSS[0]}:{BOSS[1]}".encode()).decode()
        code, page = _get(f"{base}/", {"Authorization": f"Basic {token}"})
        assert code == 200 and "DICOM listener" in page
        assert _get(f"{base}/", {"Authorization": f"Bearer {ADMIN_TOKEN}"})[0] == 401
    finally:
        process.stop()
    assert "admin page on http://127.0.0.1:" in process.log()


@pytest.mark.integration
def test_flower_and_dermpacs_queues_see_a_running_worker(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dispatch worker on Redis: ``dermpacs queues`` names it as the queue's consumer, and
    Flower, started as the deployment files start it, sees it and its queue."""
    import uuid

    pytest.importorskip("flower")
    suffix = uuid.uuid4().hex[:8]
    dispatch, inference = f"dispatch-{suffix}", f"inference-{suffix}"
    config = tmp_path / "dermpacs.toml"
    config.write_text(
        f"""
[storage]
root = "{tmp_path / "storage"}"
[broker]
url = "{redis_url}"
[queues.inference]
name = "{inference}"
[queues.dispatch]
name = "{dispatch}"
[admin]
inspect_timeout = 2.0
"""
    )
    flower_port = services.free_port()
    worker = services.dermpacs_process(
        "worker",
        config,
        log_path=tmp_path / "worker.log",
        extra_args=["--queues", dispatch, "--pool", "threads", "--concurrency", "1"],
    )
    flower = services.ServiceProcess(
        [
            sys.executable,
            "-m",
            "celery",
            f"--broker={redis_url}",
            "flower",
            "--address=127.0.0.1",
            f"--port={flower_port}",
            "--basic-auth=flower:flower-password",
            "--persistent=False",
        ],
        log_path=tmp_path / "flower.log",
    )
    try:

        def consumers() -> list[str] | None:
            code, out = run_cli(capsys, "queues", "--config", str(config), "--json")
            queues = {q["name"]: q for q in json.loads(out)}
            return queues[dispatch]["consumers"] or None

        try:
            (name,) = services.wait_until(consumers, timeout=90, interval=1, what="a consumer")
        except TimeoutError:
            pytest.fail(f"no consumer seen\n{worker.log()[-3000:]}")
        assert name.startswith(f"dermpacs-{dispatch}-")
        code, out = run_cli(capsys, "queues", "--config", str(config), "--json")
        assert {q["name"]: q["consumers"] for q in json.loads(out)}[inference] == []

        auth = "Basic " + base64.b64encode(b"flower:flower-password").decode()

        def flower_workers() -> dict[str, Any] | None:
            code, body = _get(
                f"http://127.0.0.1:{flower_port}/api/workers?refresh=1", {"Authorization": auth}
            )
            workers = json.loads(body) if code == 200 else {}
            return workers if name in workers else None

        try:
            workers = services.wait_until(flower_workers, timeout=60, interval=1, what="Flower")
        except TimeoutError:
            pytest.fail(f"Flower did not list {name}\n{flower.log()[-3000:]}")
        assert [q["name"] for q in workers[name]["active_queues"]] == [dispatch]
        assert _get(f"http://127.0.0.1:{flower_port}/api/workers")[0] == 401
    finally:
        flower.stop()
        worker.stop()
        services.delete_redis_keys(f"*{suffix}*")
