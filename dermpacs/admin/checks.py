"""Live checks an admin runs: C-ECHO a destination or the listener, write to a folder, and
whether the job store and the broker answer (readiness).

Each check returns a plain record with what was asked, whether it worked, and why not; none
raises for the peer's faults.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text

from dermpacs.config import Destination, Settings
from dermpacs.dispatch.destinations import folder_path, peer_address
from dermpacs.dispatch.scu import EchoResult, PeerAddress, SenderTimeouts, echo
from dermpacs.jobs.store import JobStore

# Listening on every address: C-ECHO it on loopback.
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def listener_address(settings: Settings) -> tuple[str, int]:
    """Where the admin page reaches the listener: ``admin.listener_host`` or ``listener.host``
    (loopback when that is a wildcard)."""
    host = settings.admin.listener_host or settings.listener.host
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    return host, settings.listener.port


def _echo_timeouts(settings: Settings) -> SenderTimeouts:
    timeout = settings.admin.echo_timeout
    return SenderTimeouts(acse=timeout, dimse=timeout, network=timeout)


def probe_listener(settings: Settings) -> EchoResult:
    """C-ECHO our own listener, calling as the first allowed AE title when there is a list."""
    host, port = listener_address(settings)
    allowed = settings.listener.allowed_calling_aets
    calling = allowed[0] if allowed else settings.dispatch.calling_ae_title
    peer = PeerAddress(
        ae_title=settings.listener.ae_title, host=host, port=port, calling_ae_title=calling
    )
    return echo(peer, _echo_timeouts(settings))


@dataclass(frozen=True)
class DestinationCheck:
    """The outcome of testing one destination (C-ECHO, or a test write for a folder)."""

    name: str
    kind: str
    address: str
    ok: bool
    detail: str
    seconds: float
    status: int | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def check_folder(path: Path) -> tuple[bool, str]:
    """Whether dermpacs can write into ``path`` (created if missing), by writing a file."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dermpacs-check-") as handle:
            handle.write(b"dermpacs destination check\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        return False, f"cannot write: {exc.strerror or exc}"
    return True, "writable"


def check_destination(destination: Destination, settings: Settings) -> DestinationCheck:
    """Test one ``[[destinations]]`` entry: C-ECHO a DICOM peer, write into a folder."""
    if destination.kind == "folder":
        path = folder_path(destination, Path(settings.storage.root))
        started = time.perf_counter()
        ok, detail = check_folder(path)
        return DestinationCheck(
            destination.name, "folder", str(path), ok, detail, time.perf_counter() - started
        )
    # The peer as delivery sees it (TLS included), only the timeouts are the page's.
    result = echo(peer_address(destination, settings.dispatch), _echo_timeouts(settings))
    return DestinationCheck(
        destination.name,
        "dicom",
        result.address,
        result.ok,
        result.detail,
        result.seconds,
        result.status,
    )


def find_destination(settings: Settings, name: str) -> Destination:
    """The configured destination called ``name``.

    Raises
    ------
    KeyError
        No destination has that name.
    """
    for destination in settings.destinations:
        if destination.name == name:
            return destination
    raise KeyError(name)


@dataclass(frozen=True)
class Readiness:
    """Whether this process can serve: each dependency and what it answered."""

    ready: bool
    checks: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {"ready": self.ready, "checks": self.checks}


def check_job_store(store: JobStore) -> str | None:
    """None when the job store answers a query, else why not."""
    try:
        with store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def check_broker(settings: Settings) -> str | None:
    """None when the broker accepts a connection, else why not."""
    from dermpacs.admin.queues import inspection_app

    try:
        with inspection_app(settings) as app, app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=settings.admin.echo_timeout)
            connection.default_channel  # noqa: B018 (opening a channel is the check)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def readiness(settings: Settings, store: JobStore) -> Readiness:
    """The admin page is ready when the job store and the broker answer."""
    problems = {"job_store": check_job_store(store), "broker": check_broker(settings)}
    return Readiness(
        ready=all(p is None for p in problems.values()),
        checks={name: problem or "ok" for name, problem in problems.items()},
    )
