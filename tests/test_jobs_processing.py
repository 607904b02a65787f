"""The processing stage on spooled photos, with small randomly initialised networks.

Plumbing only: the networks are not trained (tests/services.py::write_plumbing_weights), so
these tests check that a job moves through claim, decode, analysis, SEG/SR/overlay and the
job store, and how failures are classified; not what the method finds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread

from dermpacs.config import Settings
from dermpacs.jobs import (
    DeliveryState,
    JobState,
    JobStore,
    ReceivedInstance,
    ResultKind,
    make_engine,
)
from dermpacs.processing import model_version, process_job, shared_analyser
from tests import services
from tests.photos import make_img2dcm_photo, skin_photo_rgb


@pytest.fixture(scope="module")
def plumbing_model(tmp_path_factory) -> dict:
    return services.write_plumbing_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture
def settings(tmp_path, plumbing_model) -> Settings:
    return Settings.model_validate(
        {
            "storage": {"root": str(tmp_path / "var")},
            "model": plumbing_model,
            "queues": {"inference": {"name": "inference", "max_attempts": 2}},
            "destinations": [
                {"name": "pacs", "kind": "dicom"},
                {"name": "outbox", "kind": "folder", "objects": ["overlay", "sr"]},
            ],
        }
    )


@pytest.fixture
def store(tmp_path):
    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}"), actor="test")
    store.create_schema()
    yield store
    store.dispose()


def spool(store: JobStore, path: Path, settings: Settings) -> int:
    ds = dcmread(path, stop_before_pixels=True)
    return store.record_received(
        ReceivedInstance(
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            calling_ae_title="CAM1",
            spool_path=str(path),
        ),
        model_version=model_version(settings),
    ).job_id


@pytest.fixture
def camera_photo(tmp_path) -> Path:
    return make_img2dcm_photo(tmp_path / "camera", skin_photo_rgb(120, 160, seed=3))


def test_model_version_is_read_from_the_weights_headers_as_the_analyser_reports_it(settings):
    assert model_version(settings) == shared_analyser(settings).model_version


def test_model_version_names_the_missing_key(settings, tmp_path):
    from dermpacs.config import ConfigError

    settings.model.classifier_weights = str(tmp_path / "nowhere.safetensors")
    with pytest.raises(ConfigError, match="model.classifier_weights"):
        model_version(settings)


def test_a_camera_photo_becomes_seg_sr_and_overlay_in_its_study(settings, store, camera_photo):
    job_id = spool(store, camera_photo, settings)
    outcome = process_job(job_id, settings, store=store)
    assert outcome.state is JobState.RESULTS_READY and outcome.publish_dispatch
    assert outcome.retry_in is None
    detail = store.get(job_id)
    source = dcmread(camera_photo, stop_before_pixels=True)
    assert {o.kind for o in detail.outputs} == set(ResultKind)
    for output in detail.outputs:
        written = dcmread(output.path)
        assert written.StudyInstanceUID == source.StudyInstanceUID
        assert written.SeriesInstanceUID != source.SeriesInstanceUID
        assert written.SOPInstanceUID == output.sop_instance_uid
        assert Path(output.path).parent == Path(settings.storage.root) / "results" / str(job_id)
    targets = sorted((d.destination, d.kind.value) for d in detail.deliveries)
    assert targets == [
        ("outbox", "overlay"),
        ("outbox", "sr"),
        ("pacs", "overlay"),
        ("pacs", "seg"),
        ("pacs", "sr"),
    ]
    assert all(d.state is DeliveryState.PENDING for d in detail.deliveries)
    assert detail.job.finding in settings.model.classes
    assert detail.job.model_version == model_version(settings)
    # a second task for the same job does nothing but ask for dispatch
    again = process_job(job_id, settings, store=store)
    assert again.state is JobState.RESULTS_READY and again.publish_dispatch
    assert [e.to_state for e in store.get(job_id).events].count(JobState.PROCESSING) == 1


def _identity(path: str) -> tuple:
    ds = dcmread(path)
    return (
        ds.SOPInstanceUID,
        ds.SeriesInstanceUID,
        ds.StudyInstanceUID,
        ds.get("ContentDate"),
        ds.get("ContentTime"),
        ds.PixelData if "PixelData" in ds else None,
    )


def test_processing_a_job_again_writes_the_same_objects(settings, store, camera_photo):
    job_id = spool(store, camera_photo, settings)
    process_job(job_id, settings, store=store)
    first = {o.kind: _identity(o.path) for o in store.outputs(job_id)}
    # as if the worker died after writing: the job is taken over and done again
    store.fail(job_id, "test")
    store.retry(job_id)  # outputs and deliveries exist: back to dispatch...
    with store._session() as session:  # ...so force a second processing run
        from dermpacs.jobs.models import Job

        session.get(Job, job_id).state = JobState.QUEUED
        session.commit()
    assert process_job(job_id, settings, store=store).state is JobState.RESULTS_READY
    second = {o.kind: _identity(o.path) for o in store.outputs(job_id)}
    # Same UIDs, content time and pixels: the PACS sees the same instances, not new ones.
    assert first == second


def test_a_photo_that_cannot_be_read_fails_at_once(settings, store, camera_photo, tmp_path):
    broken = tmp_path / "broken.dcm"
    data = camera_photo.read_bytes()
    broken.write_bytes(data[: len(data) - 2000])  # cut inside the JPEG pixel data
    job_id = spool(store, camera_photo, settings)
    with store._session() as session:
        from dermpacs.jobs.models import Job

        session.get(Job, job_id).spool_path = str(broken)
        session.commit()
    outcome = process_job(job_id, settings, store=store)
    assert outcome.state is JobState.FAILED and outcome.retry_in is None
    job = store.get(job_id).job
    assert job.attempts == 1 and job.last_error.startswith("PhotographError[")
    # set aside with the reason; the job points at the kept copy, so a retry still works
    kept = Path(job.spool_path)
    assert kept.parent.parent == Path(settings.storage.root) / "quarantine"
    assert kept.read_bytes() == data[: len(data) - 2000] and not broken.exists()
    reason = json.loads(kept.with_suffix(".json").read_text())
    assert reason["stage"] == "processing" and reason["job_id"] == job_id
    assert reason["reason"] == job.last_error
    assert reason["sha256"] == hashlib.sha256(kept.read_bytes()).hexdigest()


def test_a_missing_spool_file_fails_the_job(settings, store, camera_photo, tmp_path):
    moved = tmp_path / "moved.dcm"
    shutil.copy(camera_photo, moved)
    job_id = spool(store, moved, settings)
    moved.unlink()
    outcome = process_job(job_id, settings, store=store)
    assert outcome.state is JobState.FAILED
    assert "spool file missing" in store.get(job_id).job.last_error


def test_weights_that_cannot_be_loaded_are_retried_then_fail(settings, store, camera_photo):
    job_id = spool(store, camera_photo, settings)
    broken = settings.model_copy(deep=True)
    broken.model.long_side = 256  # the weights say 128: refused by the analyser
    first = process_job(job_id, broken, store=store)
    assert first.state is JobState.QUEUED and first.retry_in is not None
    assert 5 <= first.retry_in <= 10
    second = process_job(job_id, broken, store=store)
    assert second.state is JobState.FAILED  # queues.inference.max_attempts = 2
    assert "WeightsError" in store.get(job_id).job.last_error


def test_a_job_held_by_another_worker_is_deferred(settings, store, camera_photo):
    job_id = spool(store, camera_photo, settings)
    store.claim_for_processing(job_id, lease=timedelta(hours=1))
    outcome = process_job(job_id, settings, store=store)
    assert outcome.state is JobState.PROCESSING
    # tried again when the holder's lease (jobs.lease_timeout) would have run out
    assert outcome.retry_in is not None
    assert settings.jobs.lease_timeout - 5 < outcome.retry_in <= settings.jobs.lease_timeout


def age(store: JobStore, job_id: int, seconds: float) -> None:
    """Make a job look unchanged for ``seconds`` (its holder stopped renewing)."""
    from dermpacs.jobs.models import Job

    with store._session() as session:
        job = session.get(Job, job_id)
        job.updated_at = job.updated_at - timedelta(seconds=seconds)
        session.commit()


def test_a_job_whose_holder_stopped_renewing_is_taken_over(settings, store, camera_photo):
    job_id = spool(store, camera_photo, settings)
    store.claim_for_processing(job_id, lease=timedelta(seconds=1))
    age(store, job_id, settings.jobs.lease_timeout + 1)  # the holder died a lease ago
    outcome = process_job(job_id, settings, store=store)
    assert outcome.state is JobState.RESULTS_READY
    detail = store.get(job_id)
    assert detail.job.attempts == 2
    assert any("taken over" in e.reason for e in detail.events)


def test_the_holder_renews_its_lease_while_it_works(settings, store, camera_photo, monkeypatch):
    import time

    import dermpacs.processing as processing

    job_id = spool(store, camera_photo, settings)
    fast = settings.model_copy(deep=True)
    fast.jobs.lease_timeout = 1.5  # renewed every 0.5 s
    renewals = []
    original_build = processing.build_job_results
    original_renew = store.renew_processing_lease

    def slow_build(*args, **kwargs):
        time.sleep(2.0)  # longer than the lease: only renewals keep the job
        busy = store.claim_for_processing(job_id, lease=timedelta(seconds=1.5))
        assert busy.status.value == "busy"
        return original_build(*args, **kwargs)

    def counted_renew(job):
        renewals.append(job)
        return original_renew(job)

    monkeypatch.setattr(processing, "build_job_results", slow_build)
    monkeypatch.setattr(store, "renew_processing_lease", counted_renew)
    outcome = process_job(job_id, fast, store=store)
    assert outcome.state is JobState.RESULTS_READY
    assert len(renewals) >= 3 and set(renewals) == {job_id}
    assert store.get(job_id).job.attempts == 1


def test_a_job_that_keeps_killing_its_worker_fails_instead_of_looping(
    settings, store, camera_photo
):
    job_id = spool(store, camera_photo, settings)
    for _ in range(settings.queues.inference.max_attempts):
        # each attempt claims the job, then the worker dies: no outcome is recorded
        claim = store.claim_for_processing(job_id, lease=timedelta(seconds=0), max_attempts=2)
        assert claim.status.value == "claimed"
    age(store, job_id, settings.jobs.lease_timeout + 1)
    outcome = process_job(job_id, settings, store=store)
    assert outcome.state is JobState.FAILED and outcome.retry_in is None
    job = store.get(job_id).job
    assert job.attempts == 2 and "without an outcome" in job.last_error
    assert Path(job.spool_path).parent.parent == Path(settings.storage.root) / "quarantine"


def test_a_task_for_an_unknown_job_is_dropped_with_a_warning(settings, store, caplog):
    outcome = process_job(424242, settings, store=store)
    assert outcome.state is JobState.FAILED and outcome.retry_in is None
    assert "no such job" in caplog.text


def test_a_cancelled_job_is_skipped_without_loading_the_models(settings, store, camera_photo):
    import dermpacs.processing as processing

    job_id = spool(store, camera_photo, settings)
    store.mark_queued([job_id])
    store.cancel(job_id, reason="not for AI", actor="admin:alice")

    def no_models(*_args, **_kwargs):
        raise AssertionError("the analyser must not be loaded for a cancelled job")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(processing, "shared_analyser", no_models)
        outcome = process_job(job_id, settings, store=store)
    assert outcome.state is JobState.CANCELLED
    assert not outcome.publish_dispatch and outcome.retry_in is None
    assert store.get(job_id).job.attempts == 0
    assert not (Path(settings.storage.root) / "results" / str(job_id)).exists()


def test_a_job_cancelled_while_it_is_processed_records_nothing(
    settings, store, camera_photo, monkeypatch
):
    import dermpacs.processing as processing

    job_id = spool(store, camera_photo, settings)
    original_build = processing.build_job_results

    def cancelled_meanwhile(*args, **kwargs):
        store.cancel(job_id, reason="patient withdrew consent", actor="admin:alice")
        return original_build(*args, **kwargs)

    monkeypatch.setattr(processing, "build_job_results", cancelled_meanwhile)
    outcome = process_job(job_id, settings, store=store)
    assert outcome.state is JobState.CANCELLED
    assert not outcome.publish_dispatch and outcome.retry_in is None
    detail = store.get(job_id)
    assert detail.job.state is JobState.CANCELLED
    assert detail.outputs == () and detail.deliveries == ()
    assert [e.to_state for e in detail.events][-2:] == [JobState.PROCESSING, JobState.CANCELLED]
