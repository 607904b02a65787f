"""The processing stage of a job: spool file -> photograph -> method -> SEG, SR, overlay.

:func:`process_job` is what the Celery task calls. It claims the job in the job store (a lease,
so two workers never process one job at once), reads the spooled photograph
(:mod:`dermpacs.imaging.decode`), runs the method (:class:`dermpacs.inference.pipeline.
Analyser`, loaded once per worker process), builds the result objects
(:func:`dermpacs.imaging.results.build_results`), writes them under
``storage.root/results/<job id>/`` and records them with one delivery row per destination and
object. Output UIDs and content times depend only on the photo, the model version and the
job's receipt time, so processing a job again writes the same objects.

Errors that the same input would raise again (a photo that cannot be read, results that
cannot be built) fail the job at once; others (I/O, a model that cannot be loaded, a database
hiccup) are retried with backoff up to ``queues.inference.max_attempts``. A job that fails
has its photo set aside in the quarantine with the reason (the job keeps pointing at it, so
an admin retry still works). A job whose attempts keep killing the worker fails after
``max_attempts`` claims instead of being redelivered forever.

The worker renews its claim while it works (:class:`dermpacs.jobs.lease.LeaseRenewal`), so
that another worker takes the job over ``jobs.lease_timeout`` after this one died.

A job an admin cancels is skipped when its task arrives; one cancelled while a worker computes
its results is not moved on by that worker (the job store refuses the change): nothing is
recorded and no delivery is published.

This module also holds the per-process singletons the worker needs (job store, analyser) and
:func:`model_version`, which reads the version from the weights' headers without loading
torch, so that the listener can key jobs on it.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermpacs.config import ConfigError, Settings
from dermpacs.durable import fsync_directory
from dermpacs.inference.versioning import combined_model_version, weights_version
from dermpacs.intake.quarantine import Quarantine, QuarantineRecord
from dermpacs.jobs.lease import LeaseRenewal
from dermpacs.jobs.models import JobState, ResultKind
from dermpacs.jobs.outcome import StageOutcome, backoff_delay
from dermpacs.jobs.store import (
    ClaimStatus,
    JobSnapshot,
    JobStore,
    OutputRecord,
    UnknownJobError,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from dermpacs.imaging.decode import Photograph
    from dermpacs.inference.pipeline import Analyser

logger = logging.getLogger(__name__)

RESULTS_DIRNAME = "results"
# Where the reference weights ship (dermpacs.inference.pipeline.DEFAULT_WEIGHTS_DIR; kept here
# so that reading the model version does not import torch).
REFERENCE_WEIGHTS_DIR = Path(__file__).parent / "inference" / "weights"
SEGMENTATION_WEIGHTS_FILE = "segmentation.safetensors"
CLASSIFIER_WEIGHTS_FILE = "classifier.safetensors"


# ---------------------------------------------------------------------------------------------
# The model version, from the weights' headers


def weights_paths(settings: Settings) -> tuple[Path, Path]:
    """The segmentation and classifier weights files the configuration names."""
    model = settings.model
    return (
        Path(model.segmentation_weights or REFERENCE_WEIGHTS_DIR / SEGMENTATION_WEIGHTS_FILE),
        Path(model.classifier_weights or REFERENCE_WEIGHTS_DIR / CLASSIFIER_WEIGHTS_FILE),
    )


def _safetensors_metadata(path: Path) -> dict[str, str]:
    # safetensors layout: u64 little-endian header size, then a JSON header whose
    # "__metadata__" maps strings to strings.
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        if size > 100_000_000:
            raise ValueError("header larger than 100 MB")
        header = json.loads(handle.read(size))
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("__metadata__ is not a mapping")
    return {str(k): str(v) for k, v in metadata.items()}


def _file_version(path: Path, key: str) -> str:
    try:
        metadata = _safetensors_metadata(path)
        version = json.loads(metadata["version"])
        digest = json.loads(metadata["payload_sha256"])
    except FileNotFoundError as exc:
        raise ConfigError(
            f"model.{key}: no weights file at {path} (train one with `dermpacs train`, "
            "or set the path in the configuration)"
        ) from exc
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise ConfigError(f"model.{key}: {path} is not a dermpacs weights file ({exc})") from exc
    if not isinstance(version, str) or not version or not isinstance(digest, str):
        raise ConfigError(f"model.{key}: {path} has no version or digest in its metadata")
    return weights_version(version, digest)


def model_version(settings: Settings) -> str:
    """The version the analyser will report (:mod:`dermpacs.inference.versioning`).

    Read from the two weights files' safetensors headers, without loading tensors or torch.
    With the SOP Instance UID it is the idempotency key of a job.

    Raises
    ------
    ConfigError
        A weights file is missing or is not a dermpacs weights file, or the combined version
        is too long for DICOM.
    """
    segmentation, classifier = weights_paths(settings)
    try:
        return combined_model_version(
            _file_version(segmentation, "segmentation_weights"),
            _file_version(classifier, "classifier_weights"),
        )
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Per-process singletons: created on first use in each (forked) worker process

_lock = threading.Lock()
_stores: dict[tuple[int, str], JobStore] = {}
_analysers: dict[tuple[int, str], Analyser] = {}


def shared_job_store(settings: Settings, *, actor: str | None = None) -> JobStore:
    """This process's job store for ``settings`` (engines are not shared across a fork)."""
    from dermpacs.jobs.store import database_url

    key = (os.getpid(), str(database_url(settings)))
    with _lock:
        store = _stores.get(key)
        if store is None:
            store = JobStore.from_settings(
                settings, actor=actor or f"worker@{os.uname().nodename}:{os.getpid()}"
            )
            _stores[key] = store
        return store


def shared_analyser(settings: Settings) -> Analyser:
    """This process's analyser: both networks loaded once, on the GPU when there is one."""
    from dermpacs.inference.pipeline import Analyser

    key = (os.getpid(), settings.model.model_dump_json() + settings.crops.model_dump_json())
    with _lock:
        analyser = _analysers.get(key)
        if analyser is None:
            analyser = Analyser.from_settings(settings)
            logger.info(
                "models loaded: %s on %s, %s runtime (pid %d)",
                analyser.model_version,
                analyser.device,
                analyser.runtime,
                os.getpid(),
            )
            _analysers[key] = analyser
        return analyser


# ---------------------------------------------------------------------------------------------
# Writing results


def results_dir(settings: Settings, job_id: int) -> Path:
    """Where a job's result objects are written."""
    return Path(settings.storage.root) / RESULTS_DIRNAME / str(job_id)


def write_result_objects(objects: dict[str, Dataset], folder: Path) -> list[OutputRecord]:
    """Write each object durably to ``folder/<kind>.dcm`` (temporary file, fsync, rename)."""
    from pydicom import dcmwrite

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for kind, dataset in objects.items():
        target = folder / f"{kind}.dcm"
        partial = folder / f".{kind}.{uuid.uuid4().hex[:8]}.part"
        try:
            with open(partial, "wb") as handle:
                dcmwrite(handle, dataset, enforce_file_format=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        records.append(
            OutputRecord(
                kind=ResultKind(kind),
                sop_class_uid=str(dataset.SOPClassUID),
                sop_instance_uid=str(dataset.SOPInstanceUID),
                series_instance_uid=str(dataset.SeriesInstanceUID),
                path=str(target),
            )
        )
    fsync_directory(folder)
    return records


# ---------------------------------------------------------------------------------------------
# The stage


def _is_permanent(exc: BaseException) -> bool:
    """Whether the same input would fail the same way (no point in retrying)."""
    from dermpacs.imaging.decode import PhotographError
    from dermpacs.imaging.derived import ResultBuildError
    from dermpacs.inference.weights import WeightsError

    if isinstance(exc, WeightsError):
        return False  # a configuration problem: an admin fixes it, retries succeed
    return isinstance(exc, PhotographError | ResultBuildError | ValueError)


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    prefix = f"{type(exc).__name__}[{reason}]" if reason is not None else type(exc).__name__
    return f"{prefix}: {exc}"


def quarantine_failed_photo(
    job: JobSnapshot, reason: str, settings: Settings, store: JobStore
) -> Path | None:
    """Set a failed job's photo aside in the quarantine with ``reason``.

    The photo is hard-linked into the quarantine, the job is pointed at that copy, then the
    spool file goes: at every moment some file holds the bytes and the job names one that
    exists. Returns the quarantine path, or None when it was not kept (full, or missing).
    """
    source = Path(job.spool_path)
    quarantine = Quarantine(
        Path(settings.storage.root), max_bytes=settings.intake.quarantine_max_mb * 2**20
    )
    if source.parent.parent == quarantine.root:  # already there (a retried job)
        return source
    kept = quarantine.keep_file(
        source,
        QuarantineRecord(
            stage="processing",
            status=None,
            reason=reason,
            sop_instance_uid=job.sop_instance_uid,
            sop_class_uid=job.sop_class_uid,
            transfer_syntax_uid=job.transfer_syntax_uid,
            calling_ae_title=job.calling_ae_title,
            job_id=job.id,
        ),
    )
    if kept is None:
        return None
    store.relocate_spool(job.id, str(kept))
    source.unlink(missing_ok=True)
    logger.info("job %d: photo kept as quarantine/%s/%s", job.id, kept.parent.name, kept.name)
    return kept


def read_for_analysis(
    source: Dataset, settings: Settings, analyser: Analyser, *, reduced: bool | None = None
) -> Photograph:
    """Decode a received photo as the worker does: full resolution (crops, overlay, the SEG's
    size) plus, with ``model.reduced_decode`` (or ``reduced``) and where the codec can scale
    (8-bit colour JPEG), a reduced-scale preview of at least the analysis long side, from
    which the segmentation input is then made."""
    from dermpacs.imaging.decode import read_photograph

    if reduced is None:
        reduced = settings.model.reduced_decode
    return read_photograph(
        source,
        max_megapixels=settings.intake.max_megapixels,
        preview_long_side=analyser.long_side if reduced else None,
    )


def build_job_results(
    job_id: int, spool_path: str, settings: Settings, analyser: Analyser, *, received: Any
) -> tuple[list[OutputRecord], str]:
    """Read the spooled photo, run the method, build and write SEG, SR and overlay.

    Returns the written objects and the finding.
    """
    from dermpacs.imaging.decode import parse_dicom_file
    from dermpacs.imaging.results import build_results

    source = parse_dicom_file(spool_path)
    photo = read_for_analysis(source, settings, analyser)
    analysis = analyser.analyse(photo.rgb, preview=photo.preview)
    results = build_results(
        source,
        photo.rgb,
        analysis,
        algorithm_version=analyser.model_version,
        class_names=settings.model.classes,
        content_datetime=received,
    )
    outputs = write_result_objects(results.as_dict(), results_dir(settings, job_id))
    return outputs, analysis.finding


def process_job(
    job_id: int,
    settings: Settings,
    *,
    store: JobStore | None = None,
    analyser: Analyser | None = None,
) -> StageOutcome:
    """Run the processing stage for one job.

    Parameters
    ----------
    job_id
        The job.
    settings
        The configuration.
    store, analyser
        Defaults: this process's shared ones.

    Returns
    -------
    StageOutcome
        ``publish_dispatch`` when results are ready; ``retry_in`` when the job should be
        tried again (a transient failure, or another worker holds it).
    """
    store = store or shared_job_store(settings)
    policy = settings.queues.inference
    lease_seconds = settings.jobs.lease_timeout
    try:
        claim = store.claim_for_processing(
            job_id, lease=timedelta(seconds=lease_seconds), max_attempts=policy.max_attempts
        )
    except UnknownJobError:
        logger.warning("job %d: no such job in the job store; task dropped", job_id)
        return StageOutcome(job_id, JobState.FAILED)
    if claim.status is ClaimStatus.DONE:
        ready = claim.job.state is JobState.RESULTS_READY
        return StageOutcome(job_id, claim.job.state, publish_dispatch=ready)
    if claim.status is ClaimStatus.FAILED:
        if claim.gave_up:
            reason = claim.job.last_error or "attempts ran out"
            logger.error("job %d failed: %s", job_id, reason)
            quarantine_failed_photo(claim.job, reason, settings, store)
        return StageOutcome(job_id, JobState.FAILED)
    if claim.status is ClaimStatus.CANCELLED:
        logger.info("job %d was cancelled; task skipped", job_id)
        return StageOutcome(job_id, JobState.CANCELLED)
    if claim.status is ClaimStatus.BUSY:
        return StageOutcome(job_id, JobState.PROCESSING, retry_in=claim.retry_after)
    job = claim.job
    try:
        # The lease is renewed from the claim on: the first task of a worker process loads
        # the models, which can take longer than a lease.
        with LeaseRenewal(
            lambda: store.renew_processing_lease(job_id), lease=lease_seconds, what=f"job {job_id}"
        ):
            analyser = analyser or shared_analyser(settings)
            outputs, finding = build_job_results(
                job_id, job.spool_path, settings, analyser, received=job.created_at
            )
    except FileNotFoundError as exc:
        state = store.record_processing_failure(
            job_id,
            f"spool file missing: {exc.filename}",
            permanent=True,
            max_attempts=policy.max_attempts,
        )
        logger.error("job %d: spool file missing; failed", job_id)
        return StageOutcome(job_id, state)
    except Exception as exc:
        permanent = _is_permanent(exc)
        state = store.record_processing_failure(
            job_id, _describe(exc), permanent=permanent, max_attempts=policy.max_attempts
        )
        if state is JobState.CANCELLED:
            logger.info("job %d was cancelled while it was processed (%s)", job_id, _describe(exc))
            return StageOutcome(job_id, state)
        if state is JobState.FAILED:
            logger.error(
                "job %d (SOP Instance %s) failed: %s",
                job_id,
                job.sop_instance_uid,
                _describe(exc),
                exc_info=not permanent,
            )
            quarantine_failed_photo(job, _describe(exc), settings, store)
            return StageOutcome(job_id, state)
        delay = backoff_delay(job.attempts, base=policy.retry_delay, cap=policy.retry_delay_max)
        logger.warning(
            "job %d attempt %d failed (%s); retry in %.0f s",
            job_id,
            job.attempts,
            _describe(exc),
            delay,
        )
        return StageOutcome(job_id, state, retry_in=delay)
    destinations = {d.name: list(d.objects) for d in settings.destinations}
    state = store.record_results(
        job_id,
        outputs,
        destinations=destinations,
        finding=finding,
        model_version=analyser.model_version,
    )
    if state is JobState.CANCELLED:
        # An admin cancelled the job while this worker computed: nothing is recorded or sent
        # (the files written under results/ are the same a retry would write).
        logger.info("job %d was cancelled while it was processed; results not recorded", job_id)
        return StageOutcome(job_id, state)
    logger.info(
        "job %d (SOP Instance %s): %s, %d objects written",
        job_id,
        job.sop_instance_uid,
        finding,
        len(outputs),
    )
    return StageOutcome(job_id, state, publish_dispatch=state is JobState.RESULTS_READY)
