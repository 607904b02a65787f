"""Real services for tests: Orthanc, dermpacs processes, PostgreSQL and Redis checks.

Everything here talks to loopback only, writes under a test's temporary folder and stops the
processes it started by their PID.
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
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
POSTGRES_ADMIN_URL = os.environ.get(
    "DERMPACS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
# Tests use their own Redis database, and queue names unique to each run on top of it.
REDIS_TEST_DB = int(os.environ.get("DERMPACS_TEST_REDIS_DB", "11"))

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Small tools


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
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


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


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
    """Write a settings tree (sections of scalars and lists, arrays of tables) as TOML."""
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
    """A child process with its output in a log file; stopped by PID.

    Parameters
    ----------
    argv
        The command.
    log_path
        Where stdout and stderr go.
    env
        Extra environment variables.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=str(cwd or REPO),
            # its own process group, so that children (pool workers) go with it
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
        """SIGTERM the process (it stops its own children), SIGKILL its group after
        ``timeout``; return the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(10)
        # pool children left behind by a killed parent
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(10)


def dermpacs_process(
    command: str,
    config: Path,
    *,
    log_path: Path,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ServiceProcess:
    """Start ``dermpacs COMMAND --config CONFIG`` with this interpreter."""
    return ServiceProcess(
        [sys.executable, "-m", "dermpacs.cli", command, "--config", str(config), *extra_args],
        log_path=log_path,
        env={"PYTHONUNBUFFERED": "1", **(env or {})},
    )


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


# ---------------------------------------------------------------------------------------------
# Orthanc, the test PACS


class Orthanc:
    """Orthanc on loopback with its own configuration and storage, on free ports."""

    def __init__(self, workdir: Path, *, aet: str = "ORTHANC") -> None:
        self.workdir = workdir
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dermpacs-test",
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
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.process: ServiceProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def start(self, timeout: float = 30.0) -> Orthanc:
        # dcmtk (under Orthanc) waits on Nagle's algorithm unless told not to (FIELD-NOTES).
        self.process = ServiceProcess(
            ["Orthanc", str(self.config_path)],
            log_path=self.workdir / "orthanc.log",
            env={"TCP_NODELAY": "1"},
            cwd=self.workdir,
        )
        wait_until(lambda: self.get("/system"), timeout=timeout, what="Orthanc /system")
        wait_until(lambda: port_open(self.dicom_port), timeout=timeout, what="Orthanc DICOM port")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
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
# PostgreSQL and Redis, where they run


def postgres_available() -> bool:
    """Whether the test PostgreSQL answers."""
    try:
        import sqlalchemy as sa

        from dermpacs.jobs.store import with_installed_driver

        engine = sa.create_engine(
            with_installed_driver(POSTGRES_ADMIN_URL), connect_args={"connect_timeout": 2}
        )
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test session; dropped afterwards. Yields its URL."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from dermpacs.jobs.store import with_installed_driver

    name = f"dermpacs_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(
        with_installed_driver(POSTGRES_ADMIN_URL), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def redis_available() -> bool:
    """Whether Redis answers on 127.0.0.1:6379."""
    try:
        import redis

        return bool(redis.Redis(REDIS_HOST, REDIS_PORT, socket_timeout=1).ping())
    except Exception:
        return False


def redis_url() -> str:
    """The URL of the tests' Redis database."""
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_TEST_DB}"


def delete_redis_keys(pattern: str) -> int:
    """Delete the keys of the tests' Redis database that match ``pattern``."""
    import redis

    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=REDIS_TEST_DB)
    keys = list(client.scan_iter(match=pattern))
    return int(client.delete(*keys)) if keys else 0


# ---------------------------------------------------------------------------------------------
# Models for plumbing tests


PLUMBING_LONG_SIDE = 128
PLUMBING_CROP_SIZE = 32


def write_plumbing_weights(folder: Path, *, seed: int = 0) -> dict[str, Any]:
    """Write small randomly initialised networks; return the ``[model]`` settings for them.

    These weights are NOT trained: they exist so that service tests can run photos through
    every stage (decode, segment, crop, classify, SEG/SR/overlay, dispatch) before, or
    independently of, the reference weights. Their findings mean nothing.
    """
    import torch

    from dermpacs.config import ModelSettings
    from dermpacs.inference.networks import DeepLabV3Plus, build_classifier
    from dermpacs.inference.weights import SEGMENTATION_CLASSES, WeightsMetadata, save_weights

    classes = list(ModelSettings().classes)
    folder.mkdir(parents=True, exist_ok=True)
    provenance = {"data": "none: random initialisation for plumbing tests", "seed": seed}
    torch.manual_seed(seed)
    segmentation = DeepLabV3Plus(aspp_channels=16, decoder_channels=16, low_level_channels=8)
    save_weights(
        segmentation.eval(),
        folder / "segmentation.safetensors",
        WeightsMetadata(
            kind="segmentation",
            classes=SEGMENTATION_CLASSES,
            input_size=PLUMBING_LONG_SIDE,
            version="0.0.0-plumbing",
            provenance=provenance,
        ),
    )
    torch.manual_seed(seed + 1)
    save_weights(
        build_classifier(len(classes), widths=(8, 8, 16, 16)).eval(),
        folder / "classifier.safetensors",
        WeightsMetadata(
            kind="classifier",
            classes=tuple(classes),
            input_size=PLUMBING_CROP_SIZE,
            version="0.0.0-plumbing",
            provenance=provenance,
        ),
    )
    return {
        "segmentation_weights": str(folder / "segmentation.safetensors"),
        "classifier_weights": str(folder / "classifier.safetensors"),
        "device": "cpu",
        "long_side": PLUMBING_LONG_SIDE,
        "classes": classes,
    }


# ---------------------------------------------------------------------------------------------
# dcmtk as the camera


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    called_aet: str = "DERMPACS",
    calling_aet: str = "CAMERA",
    syntax_option: str = "-xy",
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with dcmtk ``storescu`` to ``127.0.0.1:port``.

    ``syntax_option`` proposes the files' own transfer syntax (``-xy``: JPEG Baseline, what
    ``img2dcm`` writes; FIELD-NOTES). ``TCP_NODELAY=1`` so that dcmtk does not wait on Nagle.
    """
    return subprocess.run(
        [
            "storescu",
            "-aec",
            called_aet,
            "-aet",
            calling_aet,
            syntax_option,
            LOOPBACK,
            str(port),
            *[str(f) for f in files],
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
