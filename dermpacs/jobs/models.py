"""Tables of the job store: jobs, their audit trail, their result objects and deliveries.

One :class:`Job` per received photograph (per idempotency key: source SOP Instance UID and
model version). :class:`JobEvent` records every state change with its time and reason,
:class:`JobOutput` the result objects written for a job, and :class:`Delivery` one row per
job x destination x object, so that a job is delivered exactly when every destination has
acknowledged every object it is configured to receive.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# DICOM UIDs have at most 64 characters (PS3.5 9.1); AE titles 16 (PS3.5 6.2).
UID_LENGTH = 64
AE_LENGTH = 16
PRIORITY_LENGTH = 32
# The level of jobs recorded before levels existed (the column's server default).
LEGACY_PRIORITY = "normal"


class JobState(enum.StrEnum):
    """Where a job is in the data flow.

    ``received``: bytes spooled and row committed, not yet on the queue.
    ``queued``: a processing task was published. ``processing``: a worker claimed it.
    ``results_ready``: SEG, SR and overlay written, deliveries pending.
    ``delivered``: every destination acknowledged every object. ``failed``: given up; an
    admin may retry it. ``cancelled``: stopped by an admin (from any unfinished state); no
    stage moves it on, and only an admin retry starts it again.
    """

    RECEIVED = "received"
    QUEUED = "queued"
    PROCESSING = "processing"
    RESULTS_READY = "results_ready"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


UNFINISHED_STATES = (
    JobState.RECEIVED,
    JobState.QUEUED,
    JobState.PROCESSING,
    JobState.RESULTS_READY,
)
# An admin may cancel a job that is not finished, and retry one that failed or was cancelled.
CANCELLABLE_STATES = UNFINISHED_STATES
RETRYABLE_STATES = (JobState.FAILED, JobState.CANCELLED)
TERMINAL_STATES = (JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED)


class DeliveryState(enum.StrEnum):
    """State of one object for one destination."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"


class ResultKind(enum.StrEnum):
    """The result objects a job produces (and a destination may ask for)."""

    SEG = "seg"
    SR = "sr"
    OVERLAY = "overlay"


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Store UTC without a zone (SQLite has none), hand back timezone-aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("job store times must be timezone-aware")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as the lower-case value (readable with plain SQL), checked by a constraint.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
        create_constraint=True,
    )


class Base(DeclarativeBase):
    """Declarative base of the job store tables."""


class Job(Base):
    """One received photograph and what became of it."""

    __tablename__ = "job"
    __table_args__ = (
        UniqueConstraint("idempotency_key", name="uq_job_idempotency_key"),
        Index("ix_job_state_updated", "state", "updated_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(UID_LENGTH + 1 + 128))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    calling_ae_title: Mapped[str] = mapped_column(String(AE_LENGTH))
    spool_path: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(String(128))
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    finding: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The priority level chosen at intake (``[[queues.rules]]``); its broker priority is
    # used each time the job is published.
    priority: Mapped[str] = mapped_column(
        String(PRIORITY_LENGTH), default=LEGACY_PRIORITY, server_default=LEGACY_PRIORITY
    )

    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", order_by="JobEvent.id", cascade="all, delete-orphan"
    )
    outputs: Mapped[list[JobOutput]] = relationship(
        back_populates="job", order_by="JobOutput.id", cascade="all, delete-orphan"
    )
    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="job", order_by="Delivery.id", cascade="all, delete-orphan"
    )


class JobEvent(Base):
    """One state change of a job: the audit trail an admin reads."""

    __tablename__ = "job_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    from_state: Mapped[JobState | None] = mapped_column(
        _enum(JobState, "job_event_from"), nullable=True
    )
    to_state: Mapped[JobState] = mapped_column(_enum(JobState, "job_event_to"))
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128))

    job: Mapped[Job] = relationship(back_populates="events")


class JobOutput(Base):
    """One result object written for a job (a DICOM file under the storage root)."""

    __tablename__ = "job_output"
    __table_args__ = (UniqueConstraint("job_id", "kind", name="uq_job_output_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    kind: Mapped[ResultKind] = mapped_column(_enum(ResultKind, "result_kind"))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    path: Mapped[str] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="outputs")


class Delivery(Base):
    """One object of one job for one destination: sent, waiting or given up."""

    __tablename__ = "delivery"
    __table_args__ = (
        UniqueConstraint("job_id", "destination", "kind", name="uq_delivery_target"),
        Index("ix_delivery_state_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(128))
    kind: Mapped[ResultKind] = mapped_column(_enum(ResultKind, "delivery_kind"))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState, "delivery_state"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    job: Mapped[Job] = relationship(back_populates="deliveries")


class QueueControl(Base):
    """What an admin changed on a queue while it runs (``dermpacs queues pause|rate``).

    Workers read it when they start, so that a pause or a rate limit also holds for a worker
    that was not running when it was given.
    """

    __tablename__ = "queue_control"

    queue: Mapped[str] = mapped_column(String(128), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    rate_limit: Mapped[str | None] = mapped_column(String(32), nullable=True)  # None: configured
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(128))
