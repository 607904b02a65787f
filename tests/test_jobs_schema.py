"""Upgrading a job store made by an older dermpacs, on SQLite and PostgreSQL.

The old tables are made from the DDL dermpacs 0.x emitted before the ``cancelled`` state
existed (copied from ``CreateTable`` of that version's models), with rows in them; then the
current code opens the store.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Column, Index, Integer, MetaData, String, inspect, text

from dermpacs.jobs import JobState, JobStore, ResultKind, make_engine
from dermpacs.jobs.models import Base
from dermpacs.jobs.schema import SchemaUpgradeError, upgrade_schema
from tests import services
from tests.test_jobs_store import instance

# The tables of the release before ``cancelled``; {serial} and {timestamp} per dialect.
OLD_DDL = """
CREATE TABLE job (
    id {serial} NOT NULL,
    idempotency_key VARCHAR(193) NOT NULL,
    study_instance_uid VARCHAR(64) NOT NULL,
    series_instance_uid VARCHAR(64) NOT NULL,
    sop_instance_uid VARCHAR(64) NOT NULL,
    sop_class_uid VARCHAR(64) NOT NULL,
    transfer_syntax_uid VARCHAR(64) NOT NULL,
    calling_ae_title VARCHAR(16) NOT NULL,
    spool_path TEXT NOT NULL,
    model_version VARCHAR(128) NOT NULL,
    state VARCHAR(16) NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT,
    finding VARCHAR(64),
    created_at {timestamp} NOT NULL,
    updated_at {timestamp} NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT uq_job_idempotency_key UNIQUE (idempotency_key),
    CONSTRAINT job_state CHECK (state IN ('received', 'queued', 'processing', 'results_ready',
        'delivered', 'failed'))
);
CREATE INDEX ix_job_sop_instance_uid ON job (sop_instance_uid);
CREATE INDEX ix_job_state_updated ON job (state, updated_at);
CREATE INDEX ix_job_study_instance_uid ON job (study_instance_uid);
CREATE TABLE delivery (
    id {serial} NOT NULL,
    job_id INTEGER NOT NULL,
    destination VARCHAR(128) NOT NULL,
    kind VARCHAR(16) NOT NULL,
    state VARCHAR(16) NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT,
    next_attempt_at {timestamp} NOT NULL,
    delivered_at {timestamp},
    updated_at {timestamp} NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT uq_delivery_target UNIQUE (job_id, destination, kind),
    FOREIGN KEY(job_id) REFERENCES job (id) ON DELETE CASCADE,
    CONSTRAINT delivery_kind CHECK (kind IN ('seg', 'sr', 'overlay')),
    CONSTRAINT delivery_state CHECK (state IN ('pending', 'sending', 'delivered', 'failed'))
);
CREATE INDEX ix_delivery_state_due ON delivery (state, next_attempt_at);
CREATE TABLE job_event (
    id {serial} NOT NULL,
    job_id INTEGER NOT NULL,
    at {timestamp} NOT NULL,
    from_state VARCHAR(16),
    to_state VARCHAR(16) NOT NULL,
    reason TEXT NOT NULL,
    actor VARCHAR(128) NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(job_id) REFERENCES job (id) ON DELETE CASCADE,
    CONSTRAINT job_event_from CHECK (from_state IN ('received', 'queued', 'processing',
        'results_ready', 'delivered', 'failed')),
    CONSTRAINT job_event_to CHECK (to_state IN ('received', 'queued', 'processing',
        'results_ready', 'delivered', 'failed'))
);
CREATE INDEX ix_job_event_job_id ON job_event (job_id);
CREATE TABLE job_output (
    id {serial} NOT NULL,
    job_id INTEGER NOT NULL,
    kind VARCHAR(16) NOT NULL,
    sop_class_uid VARCHAR(64) NOT NULL,
    sop_instance_uid VARCHAR(64) NOT NULL,
    series_instance_uid VARCHAR(64) NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT uq_job_output_kind UNIQUE (job_id, kind),
    FOREIGN KEY(job_id) REFERENCES job (id) ON DELETE CASCADE,
    CONSTRAINT result_kind CHECK (kind IN ('seg', 'sr', 'overlay'))
);
"""

OLD_ROWS = """
INSERT INTO job (id, idempotency_key, study_instance_uid, series_instance_uid,
    sop_instance_uid, sop_class_uid, transfer_syntax_uid, calling_ae_title, spool_path,
    model_version, state, attempts, created_at, updated_at)
VALUES
    (1, '1.2.3.1|m1', '1.2.3', '1.2.3.4', '1.2.3.1', '1.2.840.10008.5.1.4.1.1.77.1.4',
     '1.2.840.10008.1.2.4.50', 'CAM1', '/spool/1.dcm', 'm1', 'queued', 0,
     '2026-01-02 03:04:05', '2026-01-02 03:04:06'),
    (2, '1.2.3.2|m1', '1.2.3', '1.2.3.4', '1.2.3.2', '1.2.840.10008.5.1.4.1.1.77.1.4',
     '1.2.840.10008.1.2.4.50', 'CAM1', '/spool/2.dcm', 'm1', 'results_ready', 1,
     '2026-01-02 03:04:05', '2026-01-02 03:04:09');
INSERT INTO job_event (job_id, at, from_state, to_state, reason, actor) VALUES
    (1, '2026-01-02 03:04:05', NULL, 'received', 'stored by CAM1', 'listener'),
    (1, '2026-01-02 03:04:06', 'received', 'queued', 'published', 'listener'),
    (2, '2026-01-02 03:04:05', NULL, 'received', 'stored by CAM1', 'listener');
INSERT INTO job_output (job_id, kind, sop_class_uid, sop_instance_uid, series_instance_uid,
    path) VALUES (2, 'seg', '1.2.840.10008.5.1.4.1.1.66.4', '2.25.1', '2.25.2', '/r/2/seg.dcm');
INSERT INTO delivery (job_id, destination, kind, state, attempts, next_attempt_at, updated_at)
VALUES (2, 'pacs', 'seg', 'pending', 0, '2026-01-02 03:04:09', '2026-01-02 03:04:09');
"""


def make_old_store(url: str) -> JobStore:
    """A store on ``url`` whose tables and rows an older dermpacs made."""
    engine = make_engine(url, pool_size=2)
    postgres = engine.dialect.name == "postgresql"
    ddl = OLD_DDL.format(
        serial="SERIAL" if postgres else "INTEGER",
        timestamp="TIMESTAMP WITHOUT TIME ZONE" if postgres else "DATETIME",
    )
    with engine.begin() as conn:
        for statement in (ddl + OLD_ROWS).split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
        if postgres:  # the ids were given: move the sequences past them
            for table in ("job", "job_event", "job_output", "delivery"):
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )
    return JobStore(engine, actor="test")


@pytest.fixture
def old_store(database_url: str):
    store = make_old_store(database_url)
    yield store
    store.dispose()


def test_old_store_refuses_the_new_state_until_upgraded(old_store: JobStore):
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), old_store.engine.begin() as conn:
        conn.execute(text("UPDATE job SET state = 'cancelled' WHERE id = 1"))


def test_create_schema_upgrades_an_old_store_and_keeps_its_rows(old_store: JobStore):
    old_store.create_schema()
    before = old_store.get(2)
    assert before.job.state is JobState.RESULTS_READY
    assert [o.kind for o in before.outputs] == [ResultKind.SEG]
    assert [(d.destination, d.state.value) for d in before.deliveries] == [("pacs", "pending")]
    assert [e.reason for e in old_store.get(1).events] == ["stored by CAM1", "published"]

    # the new state goes in, with its audit line, on both tables' constraints
    assert old_store.cancel(1, reason="wrong patient", actor="admin:alice") is JobState.CANCELLED
    last = old_store.get(1).events[-1]
    assert (last.from_state, last.to_state, last.actor) == (
        JobState.QUEUED,
        JobState.CANCELLED,
        "admin:alice",
    )
    assert old_store.list_jobs(states=[JobState.CANCELLED])[0].id == 1
    # ids go on from where the old rows ended
    new = old_store.record_received(instance(9), model_version="m1")
    assert new.job_id == 3

    inspector = inspect(old_store.engine)
    assert {i["name"] for i in inspector.get_indexes("job")} >= {
        "ix_job_sop_instance_uid",
        "ix_job_state_updated",
        "ix_job_study_instance_uid",
    }
    for child in ("job_event", "job_output", "delivery"):
        (fk,) = inspector.get_foreign_keys(child)
        assert fk["referred_table"] == "job", child
    # the foreign keys still cascade (the rebuilt SQLite table is the one they refer to)
    with old_store.engine.begin() as conn:
        conn.execute(text("DELETE FROM job WHERE id = 2"))
    with old_store.engine.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM delivery")).scalar_one()
        events = conn.execute(text("SELECT count(*) FROM job_event WHERE job_id = 2")).scalar()
    assert (left, events) == (0, 0)
    # an unknown value is still refused
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), old_store.engine.begin() as conn:
        conn.execute(text("UPDATE job SET state = 'bogus' WHERE id = 1"))


def test_upgrade_reports_what_it_did_and_is_then_a_no_op(old_store: JobStore):
    first = upgrade_schema(old_store.engine, Base.metadata)
    assert set(first.widened_constraints) == {"job_state", "job_event_from", "job_event_to"}
    if old_store.engine.dialect.name == "sqlite":
        assert sorted(first.rebuilt_tables) == ["job", "job_event"]
    else:
        assert first.rebuilt_tables == []
    again = upgrade_schema(old_store.engine, Base.metadata)
    assert not again.upgraded and not again.created_tables


def _metadata_with(*extra: Column, index: str | None = None) -> MetaData:
    """The current tables plus ``extra`` columns on ``job`` (a later release, say)."""
    metadata = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(metadata)
    job = metadata.tables["job"]
    for column in extra:
        job.append_column(column)
    if index:
        Index(index, job.c[extra[0].name])
    return metadata


def test_missing_columns_and_indexes_are_added_with_their_server_default(old_store: JobStore):
    metadata = _metadata_with(
        Column("rank", Integer, nullable=False, server_default=text("5")),
        Column("note", String(32), nullable=True),
        index="ix_job_rank",
    )
    report = upgrade_schema(old_store.engine, metadata)
    assert {"job.rank", "job.note"} <= set(report.added_columns)
    with old_store.engine.connect() as conn:
        rows = conn.execute(text("SELECT id, rank, note FROM job ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [(1, 5, None), (2, 5, None)]
    assert "ix_job_rank" in {i["name"] for i in inspect(old_store.engine).get_indexes("job")}
    # the old rows are still readable through the store
    assert old_store.get(1).job.state is JobState.QUEUED
    assert not upgrade_schema(old_store.engine, metadata).upgraded


def test_a_column_that_cannot_be_filled_is_refused_and_nothing_changes(old_store: JobStore):
    metadata = _metadata_with(Column("rank", Integer, nullable=False))
    with pytest.raises(SchemaUpgradeError, match=r"job\.rank is NOT NULL without a server"):
        upgrade_schema(old_store.engine, metadata)
    columns = {c["name"] for c in inspect(old_store.engine).get_columns("job")}
    assert "rank" not in columns
    # the transaction rolled back: the constraint is as old as before
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), old_store.engine.begin() as conn:
        conn.execute(text("UPDATE job SET state = 'cancelled' WHERE id = 1"))


def test_processes_starting_together_upgrade_once(database_url: str):
    make_old_store(database_url).dispose()
    stores = [JobStore(make_engine(database_url, pool_size=2)) for _ in range(3)]
    reports, errors = [], []

    def start(store: JobStore) -> None:
        try:
            reports.append(upgrade_schema(store.engine, Base.metadata))
        except Exception as exc:  # pragma: no cover - the assertion shows it
            errors.append(exc)

    services.in_threads(start, stores, timeout=60)
    try:
        assert errors == []
        assert sum(1 for r in reports if r.widened_constraints) == 1
        stores[0].cancel(2, reason="test")
        assert stores[1].get(2).job.state is JobState.CANCELLED
        assert stores[2].claim_for_processing(2, lease=timedelta(seconds=60)).status.value == (
            "cancelled"
        )
    finally:
        for store in stores:
            store.dispose()


def test_a_store_that_a_newer_version_widened_is_refused_not_narrowed(database_url: str):
    from sqlalchemy import Enum, Table

    metadata = MetaData()
    Table(
        "thing",
        metadata,
        Column("id", Integer, primary_key=True),
        Column(
            "state",
            Enum("a", "b", name="thing_state", native_enum=False, create_constraint=True),
            nullable=False,
        ),
    )
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE thing (id INTEGER NOT NULL PRIMARY KEY, state VARCHAR(1) NOT NULL, "
                "CONSTRAINT thing_state CHECK (state IN ('a', 'b', 'c')))"
            )
            conn.exec_driver_sql("INSERT INTO thing (id, state) VALUES (1, 'c')")
        with pytest.raises(SchemaUpgradeError, match=r"allows \['c'\].*newer version"):
            upgrade_schema(engine, metadata)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT state FROM thing").scalar() == "c"
    finally:
        engine.dispose()
