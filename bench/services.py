"""The processes a benchmark starts: receivers, dermpacs services, Orthanc; all on loopback.

Each process runs in its own session with its output in a log file, and is stopped by its own
process group id (never by name); the pieces the tests start too (processes, Orthanc, dcmtk,
the shared Redis) are ``tests/loopback.py``'s. dcmtk tools and Orthanc get ``TCP_NODELAY=1``:
without it they wait on Nagle's algorithm and lose 10 to 30 times their speed (FIELD-NOTES),
which would make every baseline unfair.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests import loopback

# The bench's modules reach every service through this module, so the shared ones are named
# here too (those marked F401 are not used here).
from tests.loopback import (
    LOOPBACK,
    NODELAY,
    REPO,  # noqa: F401
    Orthanc,
    ServiceProcess,
    dcmtk,
    dermpacs_argv,
    free_port,
    port_open,
    redis_available,  # noqa: F401
    wait_until,
    write_toml,
)

MAX_PDU = 131072  # the largest dcmtk accepts; what FIELD-NOTES tuned storescp with
# The bench's own Redis database (tests use 11): flushed before and after each use.
REDIS_DB = int(os.environ.get("DERMPACS_BENCH_REDIS_DB", "13"))
CALLING_AET = "BENCH"


def c_echo(port: int, called_aet: str) -> bool:
    """Whether a C-ECHO from the bench to ``127.0.0.1:port`` succeeds (the receiver is ready)."""
    return loopback.c_echo(port, called_aet=called_aet, calling_aet=CALLING_AET)


def storescu_argv(
    port: int, files: Sequence[Path], *, called_aet: str, options: Sequence[str] = ()
) -> list[str]:
    """dcmtk ``storescu`` as the bench runs it: 128 KB PDUs, calling AE title CAMERA."""
    return loopback.storescu_argv(
        port, files, called_aet=called_aet, options=["--max-pdu", str(MAX_PDU), *options]
    )


def redis_url() -> str:
    """The URL of the bench's own Redis database."""
    return loopback.redis_url(REDIS_DB)


def flush_redis() -> None:
    """Empty the bench's own Redis database (never another one)."""
    loopback.redis_database(REDIS_DB, socket_timeout=5).flushdb()


def redis_cpu() -> float:
    """CPU seconds Redis has used since it started (``INFO cpu``)."""
    info = loopback.redis_database(REDIS_DB, socket_timeout=5).info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


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
        self.processes: list[ServiceProcess] = []
        workdir.mkdir(parents=True, exist_ok=True)

    @abstractmethod
    def start(self, timeout: float = 90.0) -> Receiver:
        """Start the receiver's processes and return once it answers C-ECHO."""

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop(timeout=30.0)
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
            ServiceProcess(
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
        self.ae_title = "ORTHANC"
        self.orthanc = Orthanc(
            workdir,
            aet=self.ae_title,
            dicom_port=self.port,
            name="dermpacs-bench",
            count_received=False,  # no Lua hook: Orthanc as a hospital runs it
            settings={"MaximumPduLength": MAX_PDU, "SaveJobs": False},
            http_timeout=30.0,
        )

    def start(self, timeout: float = 60.0) -> OrthancServer:
        process = self.orthanc.start(timeout).process
        assert process is not None  # started
        self.processes.append(process)
        self._wait_ready(timeout)
        return self

    def stored_count(self) -> int:
        return self.orthanc.count_instances()


class DermpacsListener(Receiver):
    """``dermpacs listen``: admit, spool with fsync, job row committed (lazily: the spool is
    the write-ahead log), then success; the processing task is published to Redis by the
    listener's publisher process."""

    name = "dermpacs"
    description = (
        "dermpacs listen (spool written as the fragments arrive + fsync + rename + folder "
        "fsync, job row committed lazily in SQLite WAL: the spool is the write-ahead log; "
        "task published to Redis by a child process)"
    )

    def __init__(
        self, workdir: Path, *, model: Mapping[str, Any], broker_url: str, processes: int = 1
    ) -> None:
        super().__init__(workdir)
        self.model = dict(model)
        self.broker_url = broker_url
        self.config_path = workdir / "dermpacs.toml"
        self.listener_processes = processes
        if processes > 1:
            self.name = f"dermpacs-{processes}p"
            self.description = (
                f"{self.description}, listener.processes = {processes} (the listening process "
                "hands each association to the process serving the fewest)"
            )

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
                    "processes": self.listener_processes,
                },
                "broker": {"url": self.broker_url},
                "storage": {"root": str(self.workdir / "var")},
                "model": self.model,
            },
        )
        self.processes.append(
            ServiceProcess(
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
