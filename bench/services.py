"""The processes a benchmark starts: receivers, dermpacs services, Orthanc; all on loopback.

Each process runs in its own session with its output in a log file, and is stopped by its own
process group id (never by name). dcmtk tools and Orthanc get ``TCP_NODELAY=1``: without it
they wait on Nagle's algorithm and lose 10 to 30 times their speed (FIELD-NOTES), which would
make every baseline unfair.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
NODELAY = {"TCP_NODELAY": "1"}
MAX_PDU = 131072  # the largest dcmtk accepts; what FIELD-NOTES tuned storescp with
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
# The bench's own Redis database (tests use 11): flushed before and after each use.
REDIS_DB = int(os.environ.get("DERMPACS_BENCH_REDIS_DB", "13"))

T = TypeVar("T")


def dcmtk(tool: str) -> str:
    """The path of a dcmtk command-line tool.

    pynetdicom installs Python apps called ``storescu`` and ``storescp`` into the virtual
    environment; with the environment activated they come first on PATH, take other options
    and are far slower. The bench always runs dcmtk's own.
    """
    venv = Path(sys.prefix).resolve()
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        if not folder:
            continue
        candidate = Path(folder) / tool
        if venv in candidate.resolve().parents:
            continue
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError(f"dcmtk's {tool} is not installed (Debian package dcmtk; make tools)")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that ``finally`` blocks stop the services started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on ``127.0.0.1:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


def wait_until(
    probe: Callable[[], T | None], *, timeout: float, interval: float = 0.05, what: str
) -> T:
    """Call ``probe`` until it returns something truthy; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception as exc:  # still starting
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}") from last
        time.sleep(interval)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_toml(path: Path, tree: Mapping[str, Any]) -> Path:
    """Write a dermpacs settings tree (tables, nested tables, arrays of tables) as TOML."""
    lines: list[str] = []

    def table(header: str, body: Mapping[str, Any]) -> None:
        lines.append(header)
        nested = []
        for key, value in body.items():
            if isinstance(value, Mapping):
                nested.append((key, value))
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for key, value in nested:
            table(f"[{header.strip('[]')}.{key}]", value)

    for section, body in tree.items():
        if isinstance(body, list):
            for item in body:
                table(f"[[{section}]]", item)
        else:
            table(f"[{section}]", body)
    path.write_text("\n".join(lines))
    return path


class Process:
    """A child process in its own session, output to ``log_path``; stopped by its PID group."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=str(cwd or REPO),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the process (it stops its own children: Celery's pool, storescp's forks),
        SIGKILL its group after ``timeout`` or when children are left; the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # children a killed parent left behind
        self._log.close()
        return self.process.returncode


def c_echo(port: int, called_aet: str) -> bool:
    """Whether a C-ECHO to ``127.0.0.1:port`` succeeds (the receiver is ready)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate(LOOPBACK, port, ae_title=called_aet)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        assoc.release()


# ---------------------------------------------------------------------------------------------
# Receivers


class Receiver(ABC):
    """A C-STORE receiver under test: a name, a port, an AE title and the process."""

    name = "receiver"
    description = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.ae_title = "ANY-SCP"
        self.processes: list[Process] = []
        workdir.mkdir(parents=True, exist_ok=True)

    @abstractmethod
    def start(self, timeout: float = 90.0) -> Receiver:
        """Start the receiver's processes and return once it answers C-ECHO."""

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def logs(self) -> str:
        return "\n".join(p.log()[-3000:] for p in self.processes)

    def _wait_ready(self, timeout: float) -> None:
        try:
            wait_until(
                lambda: port_open(self.port) and c_echo(self.port, self.ae_title),
                timeout=timeout,
                interval=0.1,
                what=f"{self.name} on port {self.port}",
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.logs()}") from exc


class StoreSCP(Receiver):
    """dcmtk ``storescp``, tuned: TCP_NODELAY, 128 KB PDUs, one forked child per association.

    It writes each object to a file (no fsync) and records nothing else.
    """

    name = "storescp"
    description = "dcmtk storescp (TCP_NODELAY=1, --max-pdu 131072, --fork, files without fsync)"

    def start(self, timeout: float = 30.0) -> StoreSCP:
        self.ae_title = "STORESCP"
        out = self.workdir / "files"
        out.mkdir(exist_ok=True)
        self.processes.append(
            Process(
                [
                    dcmtk("storescp"),
                    "--fork",
                    "-aet",
                    self.ae_title,
                    "--max-pdu",
                    str(MAX_PDU),
                    "+xa",  # accept every transfer syntax it knows (JPEG as sent)
                    "-od",
                    str(out),
                    str(self.port),
                ],
                log_path=self.workdir / "storescp.log",
                env=NODELAY,
                cwd=self.workdir,
            )
        )
        self._wait_ready(timeout)
        return self

    def stored_count(self) -> int:
        return sum(1 for _ in (self.workdir / "files").iterdir())


class OrthancServer(Receiver):
    """Orthanc on loopback: its own configuration and storage, TCP_NODELAY, 128 KB PDUs.

    It stores each object durably (``SyncStorageArea``, the default) and indexes it in SQLite.
    """

    name = "orthanc"
    description = (
        "Orthanc 1.10 (TCP_NODELAY=1, MaximumPduLength 131072, default durable storage "
        "with SQLite index)"
    )

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.http_port = free_port()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def start(self, timeout: float = 60.0) -> OrthancServer:
        self.ae_title = "ORTHANC"
        config = {
            "Name": "dermpacs-bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "HttpBindAddress": LOOPBACK,
            "DicomPort": self.port,
            "DicomBindAddress": LOOPBACK,
            "DicomAet": self.ae_title,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "StorageCompression": False,
            "UnknownSopClassAccepted": True,
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "MaximumPduLength": MAX_PDU,
            "SaveJobs": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self.processes.append(
            Process(
                ["Orthanc", str(path)],
                log_path=self.workdir / "orthanc.log",
                env=NODELAY,
                cwd=self.workdir,
            )
        )
        wait_until(lambda: self.get("/system"), timeout=timeout, what="Orthanc /system")
        self._wait_ready(timeout)
        return self

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
            if response.headers.get_content_type() == "application/json":
                return json.loads(payload)
            return payload

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def stored_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def instances_in_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        return list(
            self.post(
                "/tools/find",
                {"Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid}},
            )
        )


def redis_url() -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


def redis_available() -> bool:
    try:
        import redis

        return bool(redis.Redis(REDIS_HOST, REDIS_PORT, socket_timeout=1).ping())
    except Exception:
        return False


def flush_redis() -> None:
    """Empty the bench's own Redis database (never another one)."""
    import redis

    redis.Redis(REDIS_HOST, REDIS_PORT, db=REDIS_DB, socket_timeout=5).flushdb()


def dermpacs_argv(command: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dermpacs.cli", command, "--config", str(config), *extra]


class DermpacsListener(Receiver):
    """``dermpacs listen``: admit, spool with fsync, job row committed (SQLite, synchronous
    FULL), then success; the processing task is published to Redis in the background."""

    name = "dermpacs"
    description = (
        "dermpacs listen (spool write + fsync + rename + folder fsync, job row in SQLite WAL "
        "synchronous=FULL, task published to Redis)"
    )

    def __init__(self, workdir: Path, *, model: Mapping[str, Any], broker_url: str) -> None:
        super().__init__(workdir)
        self.model = dict(model)
        self.broker_url = broker_url
        self.config_path = workdir / "dermpacs.toml"

    def start(self, timeout: float = 120.0) -> DermpacsListener:
        self.ae_title = "DERMPACS"
        write_toml(
            self.config_path,
            {
                "listener": {
                    "ae_title": self.ae_title,
                    "host": LOOPBACK,
                    "port": self.port,
                    "max_associations": 32,
                },
                "broker": {"url": self.broker_url},
                "storage": {"root": str(self.workdir / "var")},
                "model": self.model,
            },
        )
        self.processes.append(
            Process(
                dermpacs_argv("listen", self.config_path),
                log_path=self.workdir / "listen.log",
                env={"PYTHONUNBUFFERED": "1"},
            )
        )
        self._wait_ready(timeout)
        return self

    def stored_count(self) -> int:
        spool = self.workdir / "var" / "spool"
        return sum(1 for p in spool.glob("*/*.dcm"))
