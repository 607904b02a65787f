"""The job store: one row per received photo, the source of truth for its state."""

from dermpacs.jobs.models import DeliveryState, JobState, ResultKind
from dermpacs.jobs.reconcile import RequeueSummary, reconcile_stalled, requeue_unfinished
from dermpacs.jobs.store import (
    Claim,
    ClaimStatus,
    DeliverySnapshot,
    JobDetail,
    JobSnapshot,
    JobStore,
    JobStoreError,
    OutputRecord,
    ReceivedInstance,
    RecordOutcome,
    RetryStage,
    UnknownJobError,
    database_url,
    idempotency_key,
    make_engine,
)

__all__ = [
    "Claim",
    "ClaimStatus",
    "DeliverySnapshot",
    "DeliveryState",
    "JobDetail",
    "JobSnapshot",
    "JobState",
    "JobStore",
    "JobStoreError",
    "OutputRecord",
    "ReceivedInstance",
    "RecordOutcome",
    "RequeueSummary",
    "ResultKind",
    "RetryStage",
    "UnknownJobError",
    "database_url",
    "idempotency_key",
    "make_engine",
    "reconcile_stalled",
    "requeue_unfinished",
]
