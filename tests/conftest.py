"""Shared pytest fixtures: real services on loopback, started and stopped per test.

The helpers live in ``tests/services.py`` (on ``tests/loopback.py``, which the benchmarks
share); fixtures here only wire them to pytest. A test that needs PostgreSQL or Redis is
skipped with a reason when the service does not run on this machine (CI starts both).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The repository root on the path, so that test helpers import as ``tests.services`` (and
# ``tests.photos``...) whether pytest runs as ``pytest`` or ``python -m pytest``.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import services  # noqa: E402


@pytest.fixture(scope="session")
def postgres_session_url() -> Iterator[str]:
    """A PostgreSQL database made for this test session (dropped at the end)."""
    if not services.postgres_available():
        pytest.skip(f"PostgreSQL does not answer at {services.POSTGRES_ADMIN_URL}")
    with services.postgres_database() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_session_url: str) -> Iterator[str]:
    """An empty PostgreSQL schema for one test, as a URL whose search_path points at it."""
    import uuid

    import sqlalchemy as sa

    from dermpacs.jobs.store import with_installed_driver

    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(
        with_installed_driver(postgres_session_url), isolation_level="AUTOCOMMIT"
    )
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in postgres_session_url else "?"
    try:
        yield f"{postgres_session_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A job store URL, once for SQLite (a file under tmp_path) and once for PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def redis_url() -> str:
    """The tests' Redis database URL; skips when Redis does not run here."""
    if not services.redis_available():
        pytest.skip("Redis does not answer on 127.0.0.1:6379")
    return services.redis_url()


def _need_tool(name: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed (make tools)")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[services.Orthanc]:
    """Orthanc on loopback with its own configuration and storage, stopped after the test."""
    _need_tool("Orthanc")
    server = services.Orthanc(tmp_path / "orthanc").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dcmtk() -> None:
    """Skip unless dcmtk (storescu, img2dcm) is installed."""
    for tool in ("storescu", "img2dcm"):
        _need_tool(tool)


@pytest.fixture(scope="session")
def plumbing_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``[model]`` settings for small randomly initialised networks (plumbing tests only)."""
    return services.write_plumbing_weights(tmp_path_factory.mktemp("plumbing-weights"))


@pytest.fixture(scope="session")
def camera_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small camera photo (64 x 96, ``img2dcm`` JPEG) that bursts are cloned from."""
    _need_tool("img2dcm")
    from tests.photos import make_img2dcm_photo, skin_photo_rgb

    return make_img2dcm_photo(tmp_path_factory.mktemp("camera"), skin_photo_rgb(64, 96, seed=5))


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[services.RedisServer]:
    """A redis-server of this test alone (its own port and folder), stopped afterwards."""
    _need_tool("redis-server")
    server = services.RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
