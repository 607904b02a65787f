"""Helpers of the admin tests (no tests here): a job store with jobs in every state, users.

The jobs are moved through the real :class:`~dermpacs.jobs.store.JobStore` API, the way the
listener, the workers and dispatch move them, so that the pages and metrics read what
production writes.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from dermpacs.admin.auth import hash_password
from dermpacs.config import Settings
from dermpacs.jobs.models import DeliveryState, JobState, ResultKind
from dermpacs.jobs.store import JobStore, OutputRecord, ReceivedInstance
from tests import services

MODEL = "seg-0.0.0+test/cls-0.0.0+test"
LEASE = timedelta(minutes=10)

READER = ("reader", "reader-password")  # role read, plain-text password in the configuration
BOSS = ("boss", "boss-password-1")  # role admin, hashed password
READ_TOKEN = "read-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
DB_PASSWORD = "db-s3cret-pw"
# A PBKDF2 hash at few iterations: the tests check the scheme, not its cost.
BOSS_HASH = hash_password(BOSS[1], iterations=1000)

# The overlay test image: a left half of one colour, a right half of another.
OVERLAY_LEFT = (200, 40, 40)
OVERLAY_RIGHT = (30, 160, 60)


def basic(user: tuple[str, str]) -> dict[str, str]:
    token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def admin_section() -> dict[str, Any]:
    return {
        "users": [
            {"name": READER[0], "password": READER[1], "role": "read"},
            {"name": BOSS[0], "password": BOSS_HASH, "role": "admin"},
        ],
        "tokens": [
            {"name": "prometheus", "token": READ_TOKEN, "role": "read"},
            {"name": "ops", "token": ADMIN_TOKEN, "role": "admin"},
        ],
        "echo_timeout": 2.0,
        "inspect_timeout": 0.5,
    }


def make_settings(root: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings for an admin test: storage under ``root``, a folder and a DICOM destination."""
    tree: dict[str, Any] = {
        "storage": {"root": str(root / "storage")},
        "database": {"url": database_url},
        "listener": {"port": services.free_port(), "ae_title": "DERMPACS"},
        "admin": admin_section(),
        "destinations": [
            {"name": "outbox", "kind": "folder", "path": "outbox"},
            {
                "name": "pacs",
                "kind": "dicom",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": services.free_port(),
            },
        ],
    }
    tree.update(overrides)
    return Settings.model_validate(tree)


def write_overlay(path: Path, *, rows: int = 60, columns: int = 80) -> Path:
    """A small RGB Secondary Capture standing in for a worker's overlay."""
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.zeros((rows, columns, 3), dtype=np.uint8)
    pixels[:, : columns // 2] = OVERLAY_LEFT
    pixels[:, columns // 2 :] = OVERLAY_RIGHT
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientName = "Test^Patient"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def instance(n: int, caller: str = "CAM1") -> ReceivedInstance:
    return ReceivedInstance(
        study_instance_uid=f"1.2.826.0.1.3680043.10.1.{n}",
        series_instance_uid=f"1.2.826.0.1.3680043.10.1.{n}.1",
        sop_instance_uid=f"1.2.826.0.1.3680043.10.1.{n}.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.4",
        transfer_syntax_uid="1.2.840.10008.1.2.4.50",
        calling_ae_title=caller,
        spool_path=f"/spool/{n}.dcm",
    )


@dataclass
class PopulatedJobs:
    """Ids of the jobs made by :func:`populate_jobs`, one per situation."""

    received: int
    queued: int
    processing: int
    results_ready: int
    delivered: int
    failed_processing: int
    failed_delivery: int
    cancelled: int

    def ids(self) -> list[int]:
        return list(self.__dict__.values())


def _results(store: JobStore, job_id: int, root: Path) -> None:
    folder = root / "results" / str(job_id)
    overlay = write_overlay(folder / "overlay.dcm")
    outputs = [
        OutputRecord(
            kind=kind,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
            sop_instance_uid=f"2.25.{job_id}{i}",
            series_instance_uid=f"2.25.9{job_id}{i}",
            path=str(overlay if kind is ResultKind.OVERLAY else folder / f"{kind.value}.dcm"),
        )
        for i, kind in enumerate(ResultKind)
    ]
    state = store.record_results(
        job_id,
        outputs,
        destinations={"pacs": list(ResultKind)},
        finding="atopic_dermatitis",
        model_version=MODEL,
    )
    assert state is JobState.RESULTS_READY


def populate_jobs(store: JobStore, root: Path) -> PopulatedJobs:
    """Eight jobs: one in each state, and two failures (processing, delivery)."""
    ids = []
    for n in range(8):
        outcome = store.record_received(instance(n, caller=f"CAM{n}"), model_version=MODEL)
        ids.append(outcome.job_id)
    received, queued, processing, ready, delivered, failed_p, failed_d, cancelled = ids
    store.mark_queued(ids[1:])
    store.cancel(cancelled, reason="sent by mistake", actor="admin:alice")
    for job_id in ids[2:7]:
        assert store.claim_for_processing(job_id, lease=LEASE).job.state is JobState.PROCESSING
    for job_id in (ready, delivered, failed_d):
        _results(store, job_id, root)
    for row in store.claim_due_deliveries(delivered, lease=LEASE):
        store.record_delivery(row.id, delivered=True)
    assert store.settle_delivery(delivered)[0] is JobState.DELIVERED
    for row in store.claim_due_deliveries(failed_d, lease=LEASE):
        store.record_delivery(
            row.id, delivered=False, error="association with PACS@127.0.0.1:4242 rejected"
        )
    assert store.settle_delivery(failed_d)[0] is JobState.FAILED
    state = store.record_processing_failure(
        failed_p,
        "PhotographError[undecodable]: the JPEG stream ends early",
        permanent=True,
        max_attempts=3,
    )
    assert state is JobState.FAILED
    jobs = PopulatedJobs(
        received, queued, processing, ready, delivered, failed_p, failed_d, cancelled
    )
    assert {store.get(i).job.state for i in jobs.ids()} == set(JobState)
    assert all(d.state is DeliveryState.FAILED for d in store.deliveries(failed_d))
    return jobs


def use_broker(settings: Settings) -> None:
    """Configure the Celery app for ``settings`` (configure drops the old broker's pools)."""
    from workers.app import configure

    configure(settings)
