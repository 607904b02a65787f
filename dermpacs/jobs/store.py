"""The job store: the source of truth for every received photograph.

SQLAlchemy over SQLite (one file under the storage root, WAL, ``synchronous=FULL``: a commit
is on disk when it returns) or PostgreSQL (by URL, for several hosts). Two kinds of commit are
*lazy* (:meth:`JobStore.record_received`, :meth:`JobStore.mark_queued` with
``synchronous_commit=False``): atomic and consistent, but on disk only with the next synchronous
commit or checkpoint (SQLite ``synchronous=NORMAL`` for that transaction, PostgreSQL
``synchronous_commit = off``). The listener records jobs that way because the spool file, which
it fsyncs, is what makes a received photo durable: after a power cut,
:func:`dermpacs.intake.recovery.recover_spooled` records again any spool file whose job row
was lost (docs/reliability.md).
Every state change takes the job row under a write lock (``BEGIN IMMEDIATE`` on SQLite,
``SELECT ... FOR UPDATE`` on PostgreSQL), checks the state it expects and writes a
:class:`~dermpacs.jobs.models.JobEvent`, so that concurrent listeners, workers and admins
never move a job twice.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, Table, create_engine, event, func, insert, select, text, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from dermpacs.config import Settings, read_secret_file
from dermpacs.jobs.models import (
    CANCELLABLE_STATES,
    LEGACY_PRIORITY,
    RETRYABLE_STATES,
    TERMINAL_STATES,
    UNFINISHED_STATES,
    Base,
    Delivery,
    DeliveryState,
    Job,
    JobEvent,
    JobOutput,
    JobState,
    ResultKind,
    utc_now,
)
from dermpacs.jobs.schema import upgrade_schema

logger = logging.getLogger(__name__)

SQLITE_FILENAME = "jobs.sqlite3"

# record_received's statements, built once (their compiled form is cached by SQLAlchemy).
_JOB_TABLE = cast(Table, Job.__table__)
_INSERT_JOB = insert(_JOB_TABLE).returning(_JOB_TABLE.c.id)
_INSERT_EVENT = insert(cast(Table, JobEvent.__table__))


class JobStoreError(RuntimeError):
    """A job store operation cannot be done (unknown job, state that does not allow it)."""


class UnknownJobError(JobStoreError, LookupError):
    """No job has this id."""


# ---------------------------------------------------------------------------------------------
# Plain views handed to callers (detached from any session)


@dataclass(frozen=True)
class ReceivedInstance:
    """What the listener knows about a stored instance when it records it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str
    spool_path: str
    priority: str = LEGACY_PRIORITY  # the level chosen by the priority rules


@dataclass(frozen=True)
class JobSnapshot:
    """A job row as it was when read."""

    id: int
    state: JobState
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str
    spool_path: str
    model_version: str
    attempts: int
    last_error: str | None
    finding: str | None
    created_at: datetime
    updated_at: datetime
    priority: str

    @classmethod
    def of(cls, job: Job) -> JobSnapshot:
        return cls(
            id=job.id,
            state=JobState(job.state),
            study_instance_uid=job.study_instance_uid,
            series_instance_uid=job.series_instance_uid,
            sop_instance_uid=job.sop_instance_uid,
            sop_class_uid=job.sop_class_uid,
            transfer_syntax_uid=job.transfer_syntax_uid,
            calling_ae_title=job.calling_ae_title,
            spool_path=job.spool_path,
            model_version=job.model_version,
            attempts=job.attempts,
            last_error=job.last_error,
            finding=job.finding,
            created_at=job.created_at,
            updated_at=job.updated_at,
            priority=job.priority,
        )

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready mapping (times in ISO 8601, UTC)."""
        return _jsonable(self.__dict__)


@dataclass(frozen=True)
class EventSnapshot:
    """One line of a job's audit trail."""

    at: datetime
    from_state: JobState | None
    to_state: JobState
    reason: str
    actor: str

    def as_json(self) -> dict[str, Any]:
        return _jsonable(self.__dict__)


@dataclass(frozen=True)
class OutputRecord:
    """A result object written for a job."""

    kind: ResultKind
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: str

    def as_json(self) -> dict[str, Any]:
        return _jsonable(self.__dict__)


@dataclass(frozen=True)
class DeliverySnapshot:
    """One object of one job for one destination."""

    id: int
    job_id: int
    destination: str
    kind: ResultKind
    state: DeliveryState
    attempts: int
    last_error: str | None
    next_attempt_at: datetime
    delivered_at: datetime | None

    @classmethod
    def of(cls, row: Delivery) -> DeliverySnapshot:
        return cls(
            id=row.id,
            job_id=row.job_id,
            destination=row.destination,
            kind=ResultKind(row.kind),
            state=DeliveryState(row.state),
            attempts=row.attempts,
            last_error=row.last_error,
            next_attempt_at=row.next_attempt_at,
            delivered_at=row.delivered_at,
        )

    def as_json(self) -> dict[str, Any]:
        return _jsonable(self.__dict__)


@dataclass(frozen=True)
class JobDetail:
    """A job with its audit trail, result objects and deliveries."""

    job: JobSnapshot
    events: tuple[EventSnapshot, ...]
    outputs: tuple[OutputRecord, ...]
    deliveries: tuple[DeliverySnapshot, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            **self.job.as_json(),
            "events": [e.as_json() for e in self.events],
            "outputs": [o.as_json() for o in self.outputs],
            "deliveries": [d.as_json() for d in self.deliveries],
        }


@dataclass(frozen=True)
class RecordOutcome:
    """What :meth:`JobStore.record_received` did.

    ``created`` is false when the idempotency key was already known: the photo was sent
    before, and the C-STORE still succeeds. ``needs_queueing`` is true when a processing task
    must be published (a new job, or a failed one that the resend started again).
    """

    job_id: int
    created: bool
    needs_queueing: bool
    state: JobState


class ClaimStatus(StrEnum):
    """Answer to a worker that asks to process a job."""

    CLAIMED = "claimed"  # go ahead
    BUSY = "busy"  # another worker holds a fresh lease: try again after ``retry_after``
    DONE = "done"  # results exist already (or delivered): nothing to do
    FAILED = "failed"  # the job was given up: only an admin retry starts it again
    CANCELLED = "cancelled"  # an admin cancelled it: skip it (only an admin retry restarts it)


@dataclass(frozen=True)
class Claim:
    """The answer of :meth:`JobStore.claim_for_processing`.

    ``gave_up`` is true when this claim failed the job (its attempts ran out without an
    outcome); the caller then sets its photo aside.
    """

    status: ClaimStatus
    job: JobSnapshot
    retry_after: float = 0.0
    gave_up: bool = False


class RetryStage(StrEnum):
    """Which stage an admin retry starts again."""

    PROCESSING = "processing"
    DISPATCH = "dispatch"


def _jsonable(fields: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
        elif isinstance(value, Enum):
            out[key] = value.value
        else:
            out[key] = value
    return out


def idempotency_key(sop_instance_uid: str, model_version: str) -> str:
    """The key that makes a photo sent twice be processed once per model version."""
    return f"{sop_instance_uid}|{model_version}"


# ---------------------------------------------------------------------------------------------
# Engines


def database_url(settings: Settings) -> URL:
    """The configured database URL (with the password of ``database.password_file`` put
    in), or SQLite under ``storage.root`` when it is empty.

    Raises
    ------
    ConfigError
        The password file cannot be read.
    """
    if settings.database.url:
        url = make_url(settings.database.url)
        if settings.database.password_file:
            url = url.set(
                password=read_secret_file(
                    settings.database.password_file, key="database.password_file"
                )
            )
        return url
    path = Path(settings.storage.root).resolve() / SQLITE_FILENAME
    return make_url(f"sqlite:///{path}")


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # pysqlite's own transaction handling begins lazily and cannot take the write lock up
        # front; turn it off and begin IMMEDIATE ourselves, so that two writers queue on the
        # busy timeout instead of failing with "database is locked" on lock upgrade.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction is on disk (WAL fsync'd) before commit returns; the
        # listener answers C-STORE success only after that.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str | URL, *, busy_timeout_ms: int = 30_000, pool_size: int = 5) -> Engine:
    """Create an engine for the job store at ``url`` (SQLite file or PostgreSQL).

    Parameters
    ----------
    url
        A SQLAlchemy URL: ``sqlite:///path`` or ``postgresql://user@host/db``.
    busy_timeout_ms
        How long a SQLite writer waits for the write lock.
    pool_size
        Connections kept open; up to as many again are opened under load.
    """
    url = make_url(url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=pool_size,
        )
        _configure_sqlite(engine, busy_timeout_ms)
        return engine
    return create_engine(
        with_installed_driver(url),
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
    )


def with_installed_driver(url: str | URL) -> URL:
    """Name the PostgreSQL driver that is installed when the URL names none.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; dermpacs depends on psycopg2,
    so a bare URL gets ``+psycopg2`` unless psycopg 3 is there.
    """
    url = make_url(url)
    if url.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        return url.set(drivername="postgresql+psycopg2")
    return url


# ---------------------------------------------------------------------------------------------
# The store


class JobStore:
    """Read and move jobs. Each method is one short transaction.

    Parameters
    ----------
    engine
        From :func:`make_engine`.
    actor
        Who writes the audit trail lines (``listener``, ``worker@host``, ``admin``).
    """

    def __init__(self, engine: Engine, *, actor: str = "dermpacs") -> None:
        self.engine = engine
        self.actor = actor
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # SQLite lets one writer in at a time and makes the others poll with sleeps of 1, 2,
        # 5, 10 ms and more (its busy handler); the listener's receiving threads queue here
        # instead, and each goes in as soon as the one before commits.
        self._intake_writer = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, actor: str = "dermpacs") -> JobStore:
        """Open the configured job store and create its tables when they are missing.

        The pool has room for one connection per association the listener may serve, plus
        its publisher and reconciler.
        """
        pool_size = settings.listener.max_associations + 4
        store = cls(make_engine(database_url(settings), pool_size=pool_size), actor=actor)
        store.create_schema()
        return store

    def create_schema(self) -> None:
        """Create the tables that do not exist yet and upgrade those an older dermpacs made.

        See :func:`dermpacs.jobs.schema.upgrade_schema` (columns added, enum constraints
        widened, missing indexes created; one transaction under a lock).

        Raises
        ------
        SchemaUpgradeError
            The database cannot be upgraded automatically.
        """
        upgrade_schema(self.engine, Base.metadata)

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()

    # -- helpers --------------------------------------------------------------------------

    def _session(self) -> Session:
        return self._sessions()

    @contextlib.contextmanager
    def _lazy_commit_session(self) -> Iterator[Session]:
        """A session whose commit does not wait for the disk (see the module's docstring)."""
        if self.engine.dialect.name != "sqlite":
            with self._sessions() as session:
                session.execute(text("SET LOCAL synchronous_commit TO OFF"))
                yield session
            return
        # SQLite takes the safety level per connection and only outside a transaction: set it
        # on this pooled connection before the session begins, and back before it returns.
        with self.engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            assert raw is not None
            raw.execute("PRAGMA synchronous=NORMAL")
            try:
                with Session(bind=connection, expire_on_commit=False) as session:
                    yield session
            finally:
                if connection.in_transaction():
                    connection.rollback()
                raw.execute("PRAGMA synchronous=FULL")

    @staticmethod
    def _locked_job(session: Session, job_id: int) -> Job:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar()
        if job is None:
            raise UnknownJobError(f"no job {job_id}")
        return job

    def _move(
        self,
        session: Session,
        job: Job,
        to_state: JobState,
        reason: str,
        *,
        now: datetime | None = None,
        actor: str | None = None,
    ) -> None:
        now = now or utc_now()
        session.add(
            JobEvent(
                job_id=job.id,
                at=now,
                from_state=job.state,
                to_state=to_state,
                reason=reason,
                actor=actor or self.actor,
            )
        )
        job.state = to_state
        job.updated_at = now

    # -- intake ---------------------------------------------------------------------------

    def record_received(
        self, instance: ReceivedInstance, *, model_version: str, synchronous_commit: bool = True
    ) -> RecordOutcome:
        """Commit a job for a spooled instance, or find the job that already has its key.

        A resend of a photo whose job failed starts that job again from the new spool file.
        ``synchronous_commit=False``: a lazy commit (module docstring), for a caller whose
        spool file is durable and recoverable.

        Returns
        -------
        RecordOutcome
        """
        key = idempotency_key(instance.sop_instance_uid, model_version)
        now = utc_now()
        sessions = self._session if synchronous_commit else self._lazy_commit_session
        with self._intake_writer, sessions() as session:
            # Two Core INSERTs of statements built once, with their values as parameters: this
            # runs once per received photo, inside the C-STORE handler; an ORM flush, or values
            # built into a new statement each time, cost several times the CPU (SQLAlchemy
            # keys its statement cache on the whole statement, docs/benchmarks.md).
            connection = session.connection()
            try:
                job_id = connection.execute(
                    _INSERT_JOB,
                    {
                        "idempotency_key": key,
                        "study_instance_uid": instance.study_instance_uid,
                        "series_instance_uid": instance.series_instance_uid,
                        "sop_instance_uid": instance.sop_instance_uid,
                        "sop_class_uid": instance.sop_class_uid,
                        "transfer_syntax_uid": instance.transfer_syntax_uid,
                        "calling_ae_title": instance.calling_ae_title,
                        "spool_path": instance.spool_path,
                        "priority": instance.priority,
                        "model_version": model_version,
                        "state": JobState.RECEIVED,
                        "attempts": 0,
                        "created_at": now,
                        "updated_at": now,
                    },
                ).scalar_one()
                connection.execute(
                    _INSERT_EVENT,
                    {
                        "job_id": job_id,
                        "at": now,
                        "from_state": None,
                        "to_state": JobState.RECEIVED,
                        "reason": f"stored by {instance.calling_ae_title}",
                        "actor": self.actor,
                    },
                )
                session.commit()
                return RecordOutcome(job_id, True, True, JobState.RECEIVED)
            except IntegrityError:
                session.rollback()
        with sessions() as session:
            existing = session.execute(
                select(Job).where(Job.idempotency_key == key).with_for_update()
            ).scalar_one()
            if existing.state is JobState.FAILED:
                existing.spool_path = instance.spool_path
                existing.priority = instance.priority
                existing.attempts = 0
                existing.last_error = None
                self._move(
                    session, existing, JobState.RECEIVED, f"resent by {instance.calling_ae_title}"
                )
                session.commit()
                return RecordOutcome(existing.id, False, True, JobState.RECEIVED)
            return RecordOutcome(existing.id, False, False, JobState(existing.state))

    def priorities(self, job_ids: Iterable[int]) -> dict[int, str]:
        """The priority level of each job (unknown ids are left out)."""
        ids = list(job_ids)
        if not ids:
            return {}
        with self._session() as session:
            rows = session.execute(select(Job.id, Job.priority).where(Job.id.in_(ids))).all()
        return {int(job_id): str(level) for job_id, level in rows}

    def mark_queued(
        self,
        job_ids: Iterable[int],
        *,
        reason: str = "published",
        synchronous_commit: bool = True,
    ) -> int:
        """Move ``received`` jobs to ``queued`` once their task is on the broker.

        Returns the number of jobs moved (others had moved on already). With
        ``synchronous_commit=False`` the commit is lazy: a mark lost in a power cut leaves the
        job ``received``, and the reconciler publishes it again (tasks are idempotent).
        """
        moved = 0
        ids = list(job_ids)
        if not ids:
            return 0
        sessions = self._session if synchronous_commit else self._lazy_commit_session
        with self._intake_writer, sessions() as session:
            jobs = session.execute(select(Job).where(Job.id.in_(ids)).with_for_update()).scalars()
            for job in jobs:
                if job.state is JobState.RECEIVED:
                    self._move(session, job, JobState.QUEUED, reason)
                    moved += 1
            session.commit()
        return moved

    # -- processing -----------------------------------------------------------------------

    def claim_for_processing(
        self, job_id: int, *, lease: timedelta, max_attempts: int | None = None
    ) -> Claim:
        """Take a job for processing, unless another worker holds a fresh lease on it.

        A job found in ``processing`` whose last change is older than ``lease`` belonged to a
        worker that died; it is taken over (the outputs are deterministic, so doing the work
        again yields the same objects). The holder keeps its lease fresh with
        :meth:`renew_processing_lease`.

        A job that has already been claimed ``max_attempts`` times without an outcome being
        recorded killed (or was killed with) its worker each time: it fails instead of being
        tried forever (a photo that crashes a decoder, say).
        """
        now = utc_now()
        with self._session() as session:
            job = self._locked_job(session, job_id)
            state = JobState(job.state)
            if state in (JobState.RESULTS_READY, JobState.DELIVERED):
                return Claim(ClaimStatus.DONE, JobSnapshot.of(job))
            if state is JobState.FAILED:
                return Claim(ClaimStatus.FAILED, JobSnapshot.of(job))
            if state is JobState.CANCELLED:
                return Claim(ClaimStatus.CANCELLED, JobSnapshot.of(job))
            if state is JobState.PROCESSING:
                age = now - job.updated_at
                if age < lease:
                    return Claim(
                        ClaimStatus.BUSY,
                        JobSnapshot.of(job),
                        retry_after=(lease - age).total_seconds(),
                    )
                reason = f"lease expired after {age.total_seconds():.0f} s, taken over"
            else:
                reason = "claimed"
            if max_attempts is not None and job.attempts >= max_attempts:
                error = (
                    f"{job.attempts} attempt(s) ended without an outcome (the worker died or "
                    "was killed each time)"
                )
                job.last_error = error
                self._move(session, job, JobState.FAILED, error, now=now)
                session.commit()
                return Claim(ClaimStatus.FAILED, JobSnapshot.of(job), gave_up=True)
            job.attempts += 1
            self._move(session, job, JobState.PROCESSING, f"{reason} (attempt {job.attempts})")
            session.commit()
            return Claim(ClaimStatus.CLAIMED, JobSnapshot.of(job))

    def renew_processing_lease(self, job_id: int) -> bool:
        """Refresh the lease of a job being processed; False when it is no longer processing.

        Called by the worker that holds the job every third of the lease, so that a long
        task keeps its job and a dead worker's job is taken over one lease after it died.
        """
        with self._session() as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.PROCESSING)
                .values(updated_at=utc_now())
            )
            session.commit()
            return bool(getattr(result, "rowcount", 0))

    def renew_delivery_leases(self, delivery_ids: Iterable[int]) -> int:
        """Refresh the lease of deliveries being sent; returns how many are still sending."""
        ids = list(delivery_ids)
        if not ids:
            return 0
        with self._session() as session:
            result = session.execute(
                update(Delivery)
                .where(Delivery.id.in_(ids), Delivery.state == DeliveryState.SENDING)
                .values(updated_at=utc_now())
            )
            session.commit()
            return int(getattr(result, "rowcount", 0))

    def relocate_spool(self, job_id: int, spool_path: str) -> None:
        """Point a job at another copy of its received bytes (the quarantine's)."""
        with self._session() as session:
            job = self._locked_job(session, job_id)
            job.spool_path = spool_path
            session.commit()

    def release_stale(self, job_id: int, *, lease: timedelta, now: datetime | None = None) -> bool:
        """Move a ``processing`` job unchanged for ``lease`` back to ``received``.

        Its worker died (or lost the database); the reconciler publishes it again. Returns
        whether the job was moved.
        """
        now = now or utc_now()
        with self._session() as session:
            job = self._locked_job(session, job_id)
            if job.state is not JobState.PROCESSING or now - job.updated_at < lease:
                return False
            self._move(session, job, JobState.RECEIVED, "worker lease expired", now=now)
            session.commit()
            return True

    def record_results(
        self,
        job_id: int,
        outputs: Sequence[OutputRecord],
        *,
        destinations: Mapping[str, Sequence[ResultKind | str]],
        finding: str | None,
        model_version: str | None = None,
    ) -> JobState:
        """Record the written result objects and create one delivery per destination x object.

        Moves ``processing`` to ``results_ready``. Idempotent: outputs of a second run replace
        those of the first (same UIDs), deliveries that exist are kept.

        Returns
        -------
        JobState
            The job's state afterwards.
        """
        now = utc_now()
        written = {ResultKind(o.kind) for o in outputs}
        with self._session() as session:
            job = self._locked_job(session, job_id)
            if job.state is not JobState.PROCESSING:
                # Someone else finished it, or an admin failed or cancelled it, while we worked.
                return JobState(job.state)
            existing = {ResultKind(o.kind): o for o in job.outputs}
            for output in outputs:
                row = existing.get(ResultKind(output.kind))
                if row is None:
                    job.outputs.append(
                        JobOutput(
                            kind=ResultKind(output.kind),
                            sop_class_uid=output.sop_class_uid,
                            sop_instance_uid=output.sop_instance_uid,
                            series_instance_uid=output.series_instance_uid,
                            path=output.path,
                        )
                    )
                else:
                    row.sop_class_uid = output.sop_class_uid
                    row.sop_instance_uid = output.sop_instance_uid
                    row.series_instance_uid = output.series_instance_uid
                    row.path = output.path
            have = {(d.destination, ResultKind(d.kind)) for d in job.deliveries}
            for name, kinds in destinations.items():
                for kind in kinds:
                    target = (name, ResultKind(kind))
                    if target in have:
                        continue
                    if target[1] not in written:
                        raise JobStoreError(
                            f"job {job_id}: destination {name!r} wants {target[1].value}, "
                            "which was not written"
                        )
                    job.deliveries.append(
                        Delivery(
                            destination=name,
                            kind=target[1],
                            state=DeliveryState.PENDING,
                            attempts=0,
                            next_attempt_at=now,
                            updated_at=now,
                        )
                    )
                    have.add(target)
            job.finding = finding
            job.last_error = None
            if model_version:
                job.model_version = model_version
            self._move(session, job, JobState.RESULTS_READY, "results written", now=now)
            session.commit()
            return JobState.RESULTS_READY

    def record_processing_failure(
        self, job_id: int, error: str, *, permanent: bool, max_attempts: int
    ) -> JobState:
        """Record why processing failed; fail the job when it cannot succeed or ran out.

        Returns
        -------
        JobState
            ``failed``, or ``queued`` when another attempt will be made.
        """
        with self._session() as session:
            job = self._locked_job(session, job_id)
            if job.state is not JobState.PROCESSING:
                return JobState(job.state)
            job.last_error = error
            if permanent or job.attempts >= max_attempts:
                why = "cannot be processed" if permanent else f"{job.attempts} attempts failed"
                self._move(session, job, JobState.FAILED, f"{why}: {error}")
            else:
                self._move(session, job, JobState.QUEUED, f"retry after: {error}")
            session.commit()
            return JobState(job.state)

    def outputs(self, job_id: int) -> tuple[OutputRecord, ...]:
        """The result objects recorded for a job."""
        with self._session() as session:
            rows = session.execute(
                select(JobOutput).where(JobOutput.job_id == job_id).order_by(JobOutput.id)
            ).scalars()
            return tuple(_output_of(r) for r in rows)

    # -- dispatch -------------------------------------------------------------------------

    def claim_due_deliveries(
        self, job_id: int, *, lease: timedelta, now: datetime | None = None
    ) -> list[DeliverySnapshot]:
        """Take the deliveries of a job that are due now for sending.

        Pending rows whose ``next_attempt_at`` has passed, and ``sending`` rows whose sender
        has held them longer than ``lease`` (it died), move to ``sending`` with one more
        attempt. Two dispatchers of the same job never take the same row. A job that is not
        ``results_ready`` (an admin cancelled it) gives none.
        """
        now = now or utc_now()
        with self._session() as session:
            job = self._locked_job(session, job_id)
            if job.state is not JobState.RESULTS_READY:
                return []  # cancelled (or settled) since the dispatcher looked
            rows = session.execute(
                select(Delivery)
                .where(Delivery.job_id == job_id)
                .order_by(Delivery.id)
                .with_for_update()
            ).scalars()
            taken = []
            for row in rows:
                due = row.state is DeliveryState.PENDING and row.next_attempt_at <= now
                stale = row.state is DeliveryState.SENDING and now - row.updated_at >= lease
                if due or stale:
                    row.state = DeliveryState.SENDING
                    row.attempts += 1
                    row.updated_at = now
                    taken.append(row)
            session.commit()
            return [DeliverySnapshot.of(r) for r in taken]

    def record_delivery(
        self,
        delivery_id: int,
        *,
        delivered: bool,
        error: str | None = None,
        next_attempt_at: datetime | None = None,
    ) -> None:
        """Record one send: delivered, to be tried again at ``next_attempt_at``, or given up.

        ``delivered=False`` with ``next_attempt_at=None`` gives the delivery up.
        """
        now = utc_now()
        with self._session() as session:
            row = session.execute(
                select(Delivery).where(Delivery.id == delivery_id).with_for_update()
            ).scalar()
            if row is None:
                raise JobStoreError(f"no delivery {delivery_id}")
            row.updated_at = now
            row.last_error = error
            if delivered:
                row.state = DeliveryState.DELIVERED
                row.delivered_at = now
            elif next_attempt_at is None:
                row.state = DeliveryState.FAILED
            else:
                row.state = DeliveryState.PENDING
                row.next_attempt_at = next_attempt_at
            session.commit()

    def settle_delivery(self, job_id: int) -> tuple[JobState, datetime | None]:
        """Move a ``results_ready`` job to ``delivered`` or ``failed`` when its rows allow.

        Returns
        -------
        tuple
            The job's state, and when its next pending delivery is due (None if none).
        """
        with self._session() as session:
            job = self._locked_job(session, job_id)
            rows = list(job.deliveries)
            pending = [d for d in rows if d.state in (DeliveryState.PENDING, DeliveryState.SENDING)]
            next_due = min(
                (d.next_attempt_at for d in pending if d.state is DeliveryState.PENDING),
                default=None,
            )
            if job.state is not JobState.RESULTS_READY or pending:
                return JobState(job.state), next_due
            failed = [d for d in rows if d.state is DeliveryState.FAILED]
            if failed:
                errors = "; ".join(
                    f"{d.destination}/{d.kind.value}: {d.last_error}" for d in failed
                )
                job.last_error = errors
                self._move(session, job, JobState.FAILED, f"delivery given up: {errors}")
            else:
                names = sorted({d.destination for d in rows})
                self._move(
                    session,
                    job,
                    JobState.DELIVERED,
                    f"acknowledged by {', '.join(names) or 'no destination'}",
                )
            session.commit()
            return JobState(job.state), None

    def deliveries(self, job_id: int) -> list[DeliverySnapshot]:
        """The delivery rows of a job."""
        with self._session() as session:
            rows = session.execute(
                select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)
            ).scalars()
            return [DeliverySnapshot.of(r) for r in rows]

    # -- administration -------------------------------------------------------------------

    def fail(self, job_id: int, reason: str, *, actor: str | None = None) -> JobState:
        """Give a job up (used when it is too old, or by an admin)."""
        with self._session() as session:
            job = self._locked_job(session, job_id)
            if job.state in TERMINAL_STATES:
                return JobState(job.state)
            job.last_error = reason
            self._move(session, job, JobState.FAILED, reason, actor=actor)
            session.commit()
            return JobState.FAILED

    def cancel(self, job_id: int, *, reason: str, actor: str | None = None) -> JobState:
        """Cancel a job that is not finished (an admin's decision, written to the audit trail).

        From ``received`` or ``queued`` the job is simply never taken (a worker that gets its
        message skips it). From ``processing`` the worker finishes its computation, but every
        state change it then asks for is refused: it records no results and publishes no
        delivery. From ``results_ready`` the deliveries still pending are not sent (a
        dispatcher takes rows only from a ``results_ready`` job); objects already handed to a
        PACS stay there. :meth:`retry` undoes a cancel.

        Raises
        ------
        UnknownJobError
            No such job.
        JobStoreError
            The job is delivered, failed or cancelled already.
        """
        reason = reason.strip() or "no reason given"
        with self._session() as session:
            job = self._locked_job(session, job_id)
            if job.state not in CANCELLABLE_STATES:
                raise JobStoreError(
                    f"job {job_id} is {job.state.value}: only a job that is "
                    f"{', '.join(s.value for s in CANCELLABLE_STATES)} can be cancelled"
                )
            self._move(session, job, JobState.CANCELLED, f"cancelled: {reason}", actor=actor)
            session.commit()
            return JobState.CANCELLED

    def retry(self, job_id: int, *, actor: str | None = None) -> RetryStage:
        """Start a failed or cancelled job again: dispatch if its results exist, processing
        otherwise.

        Raises
        ------
        JobStoreError
            When the job is neither failed nor cancelled.
        """
        now = utc_now()
        with self._session() as session:
            job = self._locked_job(session, job_id)
            if job.state not in RETRYABLE_STATES:
                raise JobStoreError(
                    f"job {job_id} is {job.state.value}: only a failed or cancelled job can "
                    "be retried"
                )
            job.last_error = None
            if job.outputs and job.deliveries:
                for row in job.deliveries:
                    if row.state is DeliveryState.FAILED:
                        row.state = DeliveryState.PENDING
                        row.attempts = 0
                        row.next_attempt_at = now
                        row.updated_at = now
                self._move(session, job, JobState.RESULTS_READY, "retried", actor=actor)
                stage = RetryStage.DISPATCH
            else:
                job.attempts = 0
                self._move(session, job, JobState.RECEIVED, "retried", actor=actor)
                stage = RetryStage.PROCESSING
            session.commit()
            return stage

    def get(self, job_id: int) -> JobDetail:
        """A job with its audit trail, outputs and deliveries.

        Raises
        ------
        UnknownJobError
        """
        with self._session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise UnknownJobError(f"no job {job_id}")
            return JobDetail(
                job=JobSnapshot.of(job),
                events=tuple(
                    EventSnapshot(
                        at=e.at,
                        from_state=None if e.from_state is None else JobState(e.from_state),
                        to_state=JobState(e.to_state),
                        reason=e.reason,
                        actor=e.actor,
                    )
                    for e in job.events
                ),
                outputs=tuple(_output_of(o) for o in job.outputs),
                deliveries=tuple(DeliverySnapshot.of(d) for d in job.deliveries),
            )

    def list_jobs(
        self,
        *,
        states: Iterable[JobState] | None = None,
        updated_before: datetime | None = None,
        limit: int | None = 100,
        newest_first: bool = True,
    ) -> list[JobSnapshot]:
        """Jobs, filtered by state and by the time of their last change."""
        query = select(Job)
        if states is not None:
            query = query.where(Job.state.in_([JobState(s) for s in states]))
        if updated_before is not None:
            query = query.where(Job.updated_at < updated_before)
        query = query.order_by(Job.id.desc() if newest_first else Job.id.asc())
        if limit is not None:
            query = query.limit(limit)
        with self._session() as session:
            return [JobSnapshot.of(j) for j in session.execute(query).scalars()]

    def newest_created_at(self) -> datetime | None:
        """When the newest job was created; None for an empty store."""
        with self._session() as session:
            return session.execute(select(func.max(Job.created_at))).scalar()

    def spool_paths_since(self, since: datetime) -> set[str]:
        """The spool files of the jobs created or changed since ``since``."""
        with self._session() as session:
            rows = session.execute(select(Job.spool_path).where(Job.updated_at >= since))
            return {str(path) for path in rows.scalars()}

    def unfinished(self, *, updated_before: datetime | None = None) -> list[JobSnapshot]:
        """Jobs not yet delivered, failed nor cancelled, oldest first."""
        return self.list_jobs(
            states=UNFINISHED_STATES,
            updated_before=updated_before,
            limit=None,
            newest_first=False,
        )

    def overdue_dispatch(
        self, *, due_before: datetime, sending_before: datetime | None = None
    ) -> list[int]:
        """Ids of ``results_ready`` jobs whose dispatch seems to have been lost.

        A pending delivery due before ``due_before``, or (with ``sending_before``) a delivery
        taken for sending and unchanged since then: its sender died.
        """
        overdue = (Delivery.state == DeliveryState.PENDING) & (
            Delivery.next_attempt_at < due_before
        )
        if sending_before is not None:
            overdue = overdue | (
                (Delivery.state == DeliveryState.SENDING) & (Delivery.updated_at < sending_before)
            )
        query = (
            select(Delivery.job_id)
            .join(Job, Job.id == Delivery.job_id)
            .where(Job.state == JobState.RESULTS_READY)
            .where(overdue)
            .distinct()
        )
        with self._session() as session:
            return sorted(session.execute(query).scalars())

    def counts_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state."""
        with self._session() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        counts = dict.fromkeys(JobState, 0)
        for state, count in rows:
            counts[JobState(state)] = int(count)
        return counts

    def touch(self, job_ids: Iterable[int]) -> None:
        """Refresh ``updated_at`` (a reconciler that re-published these jobs)."""
        ids = list(job_ids)
        if ids:
            with self._session() as session:
                session.execute(update(Job).where(Job.id.in_(ids)).values(updated_at=utc_now()))
                session.commit()


def _output_of(row: JobOutput) -> OutputRecord:
    return OutputRecord(
        kind=ResultKind(row.kind),
        sop_class_uid=row.sop_class_uid,
        sop_instance_uid=row.sop_instance_uid,
        series_instance_uid=row.series_instance_uid,
        path=row.path,
    )
