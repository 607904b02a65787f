"""Bring a job store made by an older dermpacs up to the tables this one declares.

:func:`upgrade_schema` compares the database with the declared tables
(:data:`dermpacs.jobs.models.Base.metadata`) and, in one transaction under a lock, so that the
listener, workers and admin page starting together upgrade once:

* creates the tables that are missing (with their indexes);
* adds the columns a table lacks. A new column must be nullable or carry a server default,
  so that the rows already there get a value; anything else is refused with the column named;
* lets the enum CHECK constraints (``job_state``, ``delivery_state``...) accept the values a
  newer dermpacs added (a new job state, say). PostgreSQL drops and adds the constraint;
  SQLite cannot change a constraint, so the table is rebuilt: renamed aside, created anew,
  its rows copied, the old one dropped, its indexes created again (the procedure of
  https://www.sqlite.org/lang_altertable.html#otheralter, with foreign keys off so that the
  drop does not cascade, and ``PRAGMA foreign_key_check`` before the commit);
* creates the declared indexes that are missing.

Values are only ever added: a database whose constraint allows values this dermpacs does not
know was written by a newer version, and is refused rather than narrowed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import CheckConstraint, Connection, Engine, Enum, MetaData, Table, inspect, text
from sqlalchemy.schema import AddConstraint, CreateColumn, CreateIndex, CreateTable, DropConstraint

from dermpacs.config import ConfigError

logger = logging.getLogger(__name__)

# Any constant: the PostgreSQL advisory lock that serialises upgrades of one database.
_PG_UPGRADE_LOCK = 0x64_65_72_6D  # "derm"
_QUOTED = re.compile(r"'((?:[^']|'')*)'")


class SchemaUpgradeError(ConfigError):
    """The database cannot be brought up to date automatically (the message says why).

    A :class:`~dermpacs.config.ConfigError`: the configured job store cannot be used by this
    version, and the commands report it as they report a bad setting.
    """


@dataclass
class UpgradeReport:
    """What :func:`upgrade_schema` changed (empty when the database was up to date)."""

    created_tables: list[str] = field(default_factory=list)
    added_columns: list[str] = field(default_factory=list)
    widened_constraints: list[str] = field(default_factory=list)
    rebuilt_tables: list[str] = field(default_factory=list)
    created_indexes: list[str] = field(default_factory=list)

    @property
    def upgraded(self) -> bool:
        """Whether a table that existed was changed."""
        return bool(
            self.added_columns
            or self.widened_constraints
            or self.rebuilt_tables
            or self.created_indexes
        )

    def describe(self) -> str:
        """One line for the log."""
        parts = [
            f"{label} {', '.join(values)}"
            for label, values in (
                ("added columns", self.added_columns),
                ("widened constraints", self.widened_constraints),
                ("rebuilt tables", self.rebuilt_tables),
                ("created indexes", self.created_indexes),
            )
            if values
        ]
        return "; ".join(parts) or "nothing to do"


def _enum_constraints(table: Table) -> dict[str, tuple[CheckConstraint, set[str]]]:
    """The declared enum CHECK constraints of ``table``: name -> (constraint, allowed values)."""
    allowed_by_name: dict[str, set[str]] = {}
    for column in table.columns:
        kind = column.type
        if isinstance(kind, Enum) and kind.create_constraint and kind.name:
            allowed_by_name[kind.name] = set(kind.enums)
    found = {}
    for constraint in table.constraints:
        if isinstance(constraint, CheckConstraint) and constraint.name in allowed_by_name:
            name = str(constraint.name)
            found[name] = (constraint, allowed_by_name[name])
    return found


def _constraint_values(sqltext: str) -> set[str]:
    """The quoted literals of a CHECK constraint as the database reports it."""
    return {value.replace("''", "'") for value in _QUOTED.findall(sqltext)}


@contextmanager
def _upgrade_transaction(engine: Engine) -> Iterator[Connection]:
    """One connection in one transaction that holds the database's upgrade lock."""
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        raw = conn.connection.dbapi_connection if sqlite else None
        if raw is not None:
            # Outside any transaction (the pragmas are no-ops inside one): a rebuilt table is
            # dropped without cascading into the tables that refer to it, and renaming it aside
            # leaves their references pointing at its name.
            raw.execute("PRAGMA foreign_keys=OFF")
            raw.execute("PRAGMA legacy_alter_table=ON")
        try:
            with conn.begin():  # BEGIN IMMEDIATE on SQLite (the store's engine): the write lock
                if conn.dialect.name == "postgresql":
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_UPGRADE_LOCK}
                    )
                yield conn
                if sqlite:
                    problems = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if problems:
                        raise SchemaUpgradeError(
                            f"the upgrade would break {len(problems)} foreign key(s): "
                            f"{problems[:5]}"
                        )
        finally:
            if raw is not None:
                raw.execute("PRAGMA legacy_alter_table=OFF")
                raw.execute("PRAGMA foreign_keys=ON")


def upgrade_schema(engine: Engine, metadata: MetaData) -> UpgradeReport:
    """Create what is missing and widen what is too narrow, in one transaction.

    Parameters
    ----------
    engine
        The job store's engine (SQLite or PostgreSQL).
    metadata
        The declared tables.

    Returns
    -------
    UpgradeReport
        What was changed; it is also logged.

    Raises
    ------
    SchemaUpgradeError
        A missing column cannot be added (NOT NULL without a server default), or a constraint
        allows values this version does not know (the database is newer).
    """
    report = UpgradeReport()
    with _upgrade_transaction(engine) as conn:
        existing = set(inspect(conn).get_table_names())
        missing = [t for t in metadata.sorted_tables if t.name not in existing]
        if missing:
            metadata.create_all(conn, tables=missing)
            report.created_tables = [t.name for t in missing]
        for table in metadata.sorted_tables:
            if table.name in existing:
                _upgrade_table(conn, table, report)
    if report.created_tables:
        logger.info("job store: created tables %s", ", ".join(report.created_tables))
    if report.upgraded:
        logger.warning("job store schema upgraded: %s", report.describe())
    return report


def _upgrade_table(conn: Connection, table: Table, report: UpgradeReport) -> None:
    inspector = inspect(conn)
    have_columns = {c["name"] for c in inspector.get_columns(table.name)}
    missing_columns = [c for c in table.columns if c.name not in have_columns]
    for column in missing_columns:
        if not column.nullable and column.server_default is None:
            raise SchemaUpgradeError(
                f"column {table.name}.{column.name} is NOT NULL without a server default: "
                "the rows already in the table would have no value (give it a server_default)"
            )
    have_checks = {
        c["name"]: _constraint_values(c["sqltext"])
        for c in inspector.get_check_constraints(table.name)
        if c.get("name")
    }
    narrow = []
    for name, (constraint, allowed) in _enum_constraints(table).items():
        present = have_checks.get(name)
        if present is not None and present - allowed:
            raise SchemaUpgradeError(
                f"constraint {name} on {table.name} allows {sorted(present - allowed)}, which "
                "this dermpacs does not know: the job store was written by a newer version"
            )
        if present is None or allowed - present:
            narrow.append(constraint)
    if conn.dialect.name == "sqlite" and narrow:
        _rebuild_sqlite_table(conn, table, have_columns)
        report.rebuilt_tables.append(table.name)
        report.widened_constraints += [str(c.name) for c in narrow]
        report.added_columns += [f"{table.name}.{c.name}" for c in missing_columns]
        return  # created with every declared column and index
    for column in missing_columns:
        spec = CreateColumn(column).compile(dialect=conn.dialect)
        conn.execute(text(f"ALTER TABLE {_quote(conn, table.name)} ADD COLUMN {spec}"))
        report.added_columns.append(f"{table.name}.{column.name}")
    for constraint in narrow:
        # isolate_from_table=False: by default these constructs mark the declared constraint
        # as "not part of CREATE TABLE" for good, and a table created later would lack it.
        if constraint.name in have_checks:
            conn.execute(DropConstraint(constraint, isolate_from_table=False))
        conn.execute(AddConstraint(constraint, isolate_from_table=False))
        report.widened_constraints.append(str(constraint.name))
    have_indexes = {i["name"] for i in inspect(conn).get_indexes(table.name)}
    for index in sorted(table.indexes, key=lambda i: str(i.name)):
        if index.name not in have_indexes:
            conn.execute(CreateIndex(index))
            report.created_indexes.append(str(index.name))


def _quote(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)


def _rebuild_sqlite_table(conn: Connection, table: Table, have_columns: set[str]) -> None:
    """Re-create a SQLite table as declared, keeping its rows (ids included)."""
    name = _quote(conn, table.name)
    aside = _quote(conn, f"_dermpacs_old_{table.name}")
    # legacy_alter_table=ON: the rename leaves other tables' REFERENCES naming table.name,
    # which is the new table once it is created.
    conn.exec_driver_sql(f"ALTER TABLE {name} RENAME TO {aside}")
    conn.execute(CreateTable(table))
    kept = ", ".join(_quote(conn, c.name) for c in table.columns if c.name in have_columns)
    conn.exec_driver_sql(f"INSERT INTO {name} ({kept}) SELECT {kept} FROM {aside}")
    conn.exec_driver_sql(f"DROP TABLE {aside}")  # its indexes go with it
    for index in table.indexes:
        conn.execute(CreateIndex(index))
