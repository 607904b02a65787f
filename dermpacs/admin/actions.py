"""What an admin may change from the page: start a failed or cancelled job again, cancel an
unfinished one.

The job store decides where a retried job resumes (:meth:`JobStore.retry`: delivery when its
results exist, processing otherwise) and writes the audit line with the admin's name; the task
is then published. When the broker is down the job stays where the retry put it and the
listener's reconciler publishes it once the broker is back, so a retry is never lost.

A cancel is only a change in the job store (:meth:`JobStore.cancel`): a task already on the
broker finds the job cancelled and is skipped, so nothing needs taking off the queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from dermpacs.jobs.store import JobStore, JobStoreError, RetryStage

logger = logging.getLogger(__name__)

Publish = Callable[[int], None]


@dataclass(frozen=True)
class RetryResult:
    """What a retry did: the stage the job resumes at, and whether its task was published."""

    job_id: int
    retried: bool
    stage: str | None = None
    published: bool = False
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for the page."""
        if not self.retried:
            return f"job {self.job_id} was not retried: {self.error}"
        text = f"job {self.job_id} retried: {self.stage} again"
        if not self.published:
            text += " (broker unavailable: the reconciler publishes it when it returns)"
        return text


def retry_failed_job(
    store: JobStore,
    job_id: int,
    *,
    actor: str,
    publish_processing: Publish,
    publish_dispatch: Publish,
) -> RetryResult:
    """Start a failed job again and publish its task.

    Parameters
    ----------
    store
        The job store.
    job_id
        A job in state ``failed``.
    actor
        Who asked (written into the audit trail, e.g. ``admin:alice``).
    publish_processing, publish_dispatch
        Put a task for a job id on the inference or the dispatch queue; may raise.
    """
    try:
        stage = store.retry(job_id, actor=actor)
    except JobStoreError as exc:  # unknown job, or not failed
        return RetryResult(job_id, False, error=str(exc))
    try:
        if stage is RetryStage.DISPATCH:
            publish_dispatch(job_id)
        else:
            publish_processing(job_id)
            store.mark_queued([job_id], reason=f"published after a retry by {actor}")
    except Exception as exc:
        logger.warning("job %d retried by %s but not published: %s", job_id, actor, exc)
        return RetryResult(job_id, True, stage.value, published=False)
    logger.info("job %d retried by %s: %s again", job_id, actor, stage.value)
    return RetryResult(job_id, True, stage.value, published=True)


@dataclass(frozen=True)
class CancelResult:
    """Whether a job was cancelled, and if not, why."""

    job_id: int
    cancelled: bool
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def cancel_job(store: JobStore, job_id: int, *, actor: str, reason: str) -> CancelResult:
    """Cancel an unfinished job, writing ``actor`` and ``reason`` into its audit trail."""
    try:
        store.cancel(job_id, reason=reason, actor=actor)
    except JobStoreError as exc:  # unknown, or delivered / failed / cancelled already
        logger.warning("job %d not cancelled by %s: %s", job_id, actor, exc)
        return CancelResult(job_id, False, str(exc))
    logger.info("job %d cancelled by %s: %s", job_id, actor, reason or "no reason given")
    return CancelResult(job_id, True)
