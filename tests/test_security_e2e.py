"""The service locked down, end to end, and what it must never do.

* A camera sends over DICOM TLS to the listener's TLS port (calling-AE and IP allow-lists on);
  the results go to Orthanc over DICOM TLS too.
* Redis (the test's own) takes TLS only and a password; the listener and the worker read the
  password from ``broker.password_file`` and check Redis's certificate. Without the password
  Redis answers nothing.
* A pickled message put on the worker's queue is refused unread (Celery accepts JSON only):
  the object it would have built on unpickling (a file) never appears, and the worker goes on.
* The photo carries a distinctive patient name and ID: neither appears in any log of the run,
  in the job store, in the quarantine or in Redis; nor does the Redis password.
"""

from __future__ import annotations

import pickle
import secrets
import shutil
import sqlite3
import ssl
import time
import uuid
from pathlib import Path

import pytest
from pydicom import dcmread

from tests import services

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PATIENT_NAME = "Zebedee^Quixotic"
PATIENT_ID = "PID-938271-XQ"


class Unpickled:
    """Unpickling this creates a file: the proof that a pickle was (not) read."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def publish_pickle(url: str, ca: Path, queue: str, marker: Path) -> None:
    """Put a pickled 'process_job' message on ``queue``, as an attacker on the broker could."""
    from kombu import Connection, Exchange

    from workers.app import PROCESS_TASK

    task_id = str(uuid.uuid4())
    body = ([Unpickled(marker)], {}, {"callbacks": None, "errbacks": None, "chain": None})
    ssl_options = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
    with Connection(url, ssl=ssl_options) as connection:
        producer = connection.Producer()
        producer.publish(
            pickle.dumps(body),
            content_type="application/x-python-serialize",
            content_encoding="binary",
            exchange=Exchange(queue, type="direct"),
            routing_key=queue,
            headers={
                "lang": "py",
                "task": PROCESS_TASK,
                "id": task_id,
                "root_id": task_id,
                "parent_id": None,
                "group": None,
                "retries": 0,
                "eta": None,
                "expires": None,
                "timelimit": [None, None],
                "argsrepr": "(<job>,)",
                "kwargsrepr": "{}",
                "origin": "attacker@test",
            },
            declare=[],
        )


def test_a_locked_down_run_over_tls_leaks_no_patient_data_and_refuses_pickle(
    tmp_path, plumbing_model, camera_template
):
    for tool in ("Orthanc", "redis-server"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make tools)")
    tls = services.TlsFiles(tmp_path / "tls")
    password = secrets.token_urlsafe(24)
    password_file = tmp_path / "secrets" / "redis-password"
    password_file.parent.mkdir()
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    redis = services.RedisServer(tmp_path / "redis", password=password, tls=tls.server).start()
    orthanc = services.Orthanc(tmp_path / "orthanc", tls=tls.server).start()
    tls_port = services.free_port()
    stack = services.Stack(
        tmp_path,
        model=plumbing_model,
        database_url="",
        broker=redis,
        destinations=[
            {
                "name": "pacs",
                "kind": "dicom",
                "ae_title": orthanc.aet,
                "host": services.LOOPBACK,
                "port": orthanc.dicom_port,
                "tls": True,
                "tls_ca_certificates": str(tls.ca),
            }
        ],
        overrides={
            "listener": {
                "ae_title": "DERMPACS",
                "host": services.LOOPBACK,
                "allowed_calling_aets": ["CAMERA"],
                "allowed_hosts": ["127.0.0.1"],
                "tls_port": tls_port,
                "tls_certificate": str(tls.server_certificate),
                "tls_private_key": str(tls.server_key),
            },
            "broker": {
                "url": redis.url,
                "password_file": str(password_file),
                "tls_ca_certificates": str(tls.ca),
            },
        },
    )
    (photo,) = services.clone_photos(camera_template, tmp_path / "camera", 1)
    ds = dcmread(photo)
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.save_as(photo, enforce_file_format=True)
    study = str(ds.StudyInstanceUID)
    marker = tmp_path / "unpickled-here"
    try:
        # Redis: TLS only, and nothing without the password.
        import redis as redis_py

        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(services.LOOPBACK, redis.port, ssl=True, ssl_ca_certs=str(tls.ca)).ping()
        with pytest.raises(redis_py.ConnectionError):
            redis_py.Redis(services.LOOPBACK, redis.port, password=password).ping()
        assert redis.client().ping()

        listener = stack.start_listener()
        worker = stack.start_worker()

        # A pickle on the inference queue is refused, unread; the worker goes on.
        url = f"rediss://:{password}@{services.LOOPBACK}:{redis.port}/0"
        publish_pickle(url, tls.ca, "inference", marker)
        stack.wait(
            lambda: "untrusted content" in worker.log() or "ContentDisallowed" in worker.log(),
            timeout=60,
            what="the worker's refusal of the pickled message",
        )
        assert not marker.exists()

        # The camera over TLS; a stranger is turned away.
        context = ssl.create_default_context(cafile=str(tls.ca))
        sent = services.send_photos(tls_port, [photo], tls=(context, services.LOOPBACK))
        assert sent == {photo: 0x0000}
        stranger = services.send_photos(stack.port, [photo], calling_aet="INTRUDER")
        assert stranger == {photo: None}
        stack.wait(
            lambda: len(orthanc.instances_in_study(study)) == 3,
            timeout=180,
            what="results in Orthanc over TLS",
        )
        store = stack.store()
        try:
            (job,) = store.list_jobs(limit=None)
            assert stack.wait(
                lambda: store.get(job.id).job.state.value == "delivered",
                timeout=30,
                what="job delivered",
            )
        finally:
            store.dispose()
        time.sleep(1.0)  # the last log lines
        assert not marker.exists()

        # Where patient data and the password must not be.
        forbidden = [PATIENT_NAME, "Zebedee", "Quixotic", PATIENT_ID, password]
        places = {
            "listener log": listener.log(),
            "worker log": worker.log(),
            "job store": "\n".join(sqlite3.connect(stack.root / "jobs.sqlite3").iterdump()),
            "quarantine": "\n".join(
                p.read_text() for p in (stack.root / "quarantine").rglob("*.json")
            ),
        }
        client = redis.client()
        places["redis"] = "\n".join(repr(client.dump(key)) for key in client.scan_iter(count=1000))
        leaks = [
            (where, word) for where, text in places.items() for word in forbidden if word in text
        ]
        assert leaks == [], leaks
        assert "INTRUDER" in listener.log()  # the stranger is logged, by AE title and address
        services.record_figures(
            "security_e2e",
            {
                "camera_to_listener": "DICOM TLS, calling AE and IP allow-lists",
                "results_to_pacs": "DICOM TLS, PACS certificate checked",
                "broker": "Redis TLS only, password from broker.password_file",
                "pickle_message": "refused unread, no file created",
                "stranger_association": "rejected",
                "places_searched": sorted(places),
                "leaks": len(leaks),
            },
        )
    finally:
        stack.stop()
        orthanc.stop()
        redis.stop()
