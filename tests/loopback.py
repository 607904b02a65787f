"""The loopback services that the tests and the benchmarks both start.

Child processes stopped by their PID (never by name), free ports, waiting for a service to
answer, dermpacs settings written as TOML, C-ECHO, dcmtk's own command-line tools, Orthanc as
the PACS, and the Redis on 127.0.0.1:6379. ``tests/services.py`` (the tests' services and
fault injection) and ``bench/services.py`` (the benchmark's receivers) build on this module.

It is tooling around the service, not part of it: it imports neither pytest nor ``bench``, and
only the standard library when it loads (pynetdicom and redis where they are used), so that
``python -m bench`` can import it outside pytest.
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
# dcmtk tools and Orthanc (built on dcmtk) wait on Nagle's algorithm without it and lose 10 to
# 30 times their speed (FIELD-NOTES).
NODELAY = {"TCP_NODELAY": "1"}
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Small tools


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Call ``probe`` until it returns something truthy; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception as exc:  # the service is still starting
            last_error = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}") from (
                last_error
            )
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
    if isinstance(value, Mapping):  # in a list: an inline table
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
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


# ---------------------------------------------------------------------------------------------
# Processes


class ServiceProcess:
    """A child process in its own session, output to ``log_path``; stopped by its PID group.

    Parameters
    ----------
    argv
        The command.
    log_path
        Where stdout and stderr go.
    env
        Extra environment variables.
    cwd
        Its working folder (default: the repository).
    """

    def __init__(
        self,
        argv: Sequence[str | Path],
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
            # its own process group, so that children (pool workers, forks) go with it
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        """What the process wrote so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        """Send a signal to the process (not its group)."""
        if self.alive():
            os.kill(self.pid, signum)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the process (it stops its own children: Celery's pool, storescp's forks),
        SIGKILL its group after ``timeout``; return the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(10)
        # children a killed parent left behind
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(10)


def dermpacs_argv(command: str, config: Path, *extra: str) -> list[str]:
    """``dermpacs COMMAND --config CONFIG EXTRA...`` with this interpreter."""
    return [sys.executable, "-m", "dermpacs.cli", command, "--config", str(config), *extra]


# ---------------------------------------------------------------------------------------------
# DICOM peers: C-ECHO, dcmtk


def c_echo(port: int, *, called_aet: str = "ANY-SCP", calling_aet: str = "ECHOSCU") -> bool:
    """Whether a DICOM C-ECHO to ``127.0.0.1:port`` succeeds."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_aet)
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


def dcmtk(tool: str) -> str:
    """The path of a dcmtk command-line tool.

    pynetdicom installs Python apps called ``storescu`` and ``storescp`` into the virtual
    environment; with the environment activated they come first on PATH, take other options
    and are far slower. This finds dcmtk's own.
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


def storescu_argv(
    port: int,
    files: Sequence[Path],
    *,
    called_aet: str,
    calling_aet: str = "CAMERA",
    options: Sequence[str] = (),
) -> list[str]:
    """dcmtk ``storescu`` sending ``files`` to ``127.0.0.1:port`` over one association.

    ``options`` go before the address: ``-xy`` proposes JPEG Baseline, the files' own transfer
    syntax when ``img2dcm`` wrote them (storescu proposes uncompressed ones unless told;
    FIELD-NOTES). Run it with :data:`NODELAY` in its environment.
    """
    return [
        dcmtk("storescu"),
        "-aec",
        called_aet,
        "-aet",
        calling_aet,
        *options,
        LOOPBACK,
        str(port),
        *[str(f) for f in files],
    ]


# ---------------------------------------------------------------------------------------------
# Orthanc as the PACS


# Orthanc calls this Lua hook for every instance it receives, before storing it, also for
# an instance it already holds: its log then counts what was sent on the wire.
_RECEIVED_HOOK = """
function ReceivedInstanceFilter(dicom, origin, info)
  print('dermpacs-received ' .. dicom.SOPInstanceUID)
  return true
end
"""


class Orthanc:
    """Orthanc on loopback with its own configuration and storage, on free ports.

    With ``count_received`` every instance received is counted in its log (a Lua hook),
    duplicates included, so that a test can tell "stored once" from "sent once"
    (:meth:`received_counts`). With ``tls`` (certificate, private key, trusted CA files) its
    DICOM port speaks TLS only. ``settings`` are further configuration keys (they win).
    The configuration is written at once to :attr:`config_path`; :meth:`start` runs it.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        name: str = "dermpacs-test",
        count_received: bool = True,
        settings: Mapping[str, Any] | None = None,
        http_timeout: float = 10.0,
    ) -> None:
        self.workdir = workdir
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.http_timeout = http_timeout
        workdir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": name,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "HttpPort": self.http_port,
            "HttpBindAddress": LOOPBACK,
            "DicomPort": self.dicom_port,
            "DicomBindAddress": LOOPBACK,
            "DicomAet": aet,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "StorageCompression": False,
            "DicomScpTimeout": 30,
            "UnknownSopClassAccepted": True,
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
        }
        if count_received:
            hook = workdir / "received.lua"
            hook.write_text(_RECEIVED_HOOK)
            config["LuaScripts"] = [str(hook)]
        if tls is not None:
            certificate, key, ca = tls
            config.update(
                {
                    "DicomTlsEnabled": True,
                    "DicomTlsCertificate": str(certificate),
                    "DicomTlsPrivateKey": str(key),
                    "DicomTlsTrustedCertificates": str(ca),
                    "DicomTlsRemoteCertificateRequired": False,
                }
            )
        config.update(settings or {})
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.process: ServiceProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Start Orthanc; return once its REST API answers and its DICOM port is open."""
        self.process = ServiceProcess(
            ["Orthanc", str(self.config_path)],
            log_path=self.workdir / "orthanc.log",
            env=NODELAY,
            cwd=self.workdir,
        )
        wait_until(lambda: self.get("/system"), timeout=timeout, what="Orthanc /system")
        wait_until(lambda: port_open(self.dicom_port), timeout=timeout, what="Orthanc DICOM port")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def received_counts(self) -> dict[str, int]:
        """How many times each SOP Instance UID was received (all runs of this Orthanc)."""
        counts: dict[str, int] = {}
        log = self.workdir / "orthanc.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            marker = line.find("dermpacs-received ")
            if marker >= 0:
                uid = line[marker + len("dermpacs-received ") :].strip()
                counts[uid] = counts.get(uid, 0) + 1
        return counts

    def instances_by_study(self) -> dict[str, list[dict[str, str]]]:
        """Every instance Orthanc holds, by Study Instance UID: its SOP Instance UID and its
        series' modality (three REST calls, whatever the number of studies)."""
        studies = {
            s["ID"]: s["MainDicomTags"]["StudyInstanceUID"] for s in self.get("/studies?expand")
        }
        series = {
            s["ID"]: (studies[s["ParentStudy"]], s["MainDicomTags"].get("Modality", ""))
            for s in self.get("/series?expand")
        }
        found: dict[str, list[dict[str, str]]] = {uid: [] for uid in studies.values()}
        for instance in self.get("/instances?expand"):
            study, modality = series[instance["ParentSeries"]]
            found[study].append(
                {
                    "sop_instance_uid": instance["MainDicomTags"]["SOPInstanceUID"],
                    "modality": modality,
                }
            )
        return found

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=self.http_timeout) as response:
            payload = response.read()
        if response.headers.get_content_type() == "application/json":
            return json.loads(payload)
        return payload

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def series_in_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """The series Orthanc holds in a study (expanded), through ``/tools/find``."""
        found = self.post(
            "/tools/find",
            {"Level": "Series", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True},
        )
        return list(found)

    def instances_in_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """The instances Orthanc holds in a study (expanded)."""
        found = self.post(
            "/tools/find",
            {
                "Level": "Instance",
                "Query": {"StudyInstanceUID": study_instance_uid},
                "Expand": True,
            },
        )
        return list(found)

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def instance_file(self, orthanc_id: str) -> bytes:
        return bytes(self.get(f"/instances/{orthanc_id}/file"))

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])


# ---------------------------------------------------------------------------------------------
# The Redis on 127.0.0.1:6379, where it runs (each user keeps to a database of its own)


def redis_available() -> bool:
    """Whether Redis answers on 127.0.0.1:6379."""
    try:
        import redis

        return bool(redis.Redis(REDIS_HOST, REDIS_PORT, socket_timeout=1).ping())
    except Exception:
        return False


def redis_url(db: int) -> str:
    """The URL of database ``db`` of that Redis."""
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


def redis_database(db: int, *, socket_timeout: float | None = None) -> Any:
    """A client of database ``db`` of that Redis."""
    import redis

    return redis.Redis(REDIS_HOST, REDIS_PORT, db=db, socket_timeout=socket_timeout)
