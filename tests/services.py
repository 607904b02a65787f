"""Real services for tests: Orthanc, dermpacs processes, PostgreSQL and Redis checks.

Everything here talks to loopback only, writes under a test's temporary folder and stops the
processes it started by their PID. What the benchmarks start too (processes, Orthanc, the
shared Redis, dcmtk) lives in ``tests/loopback.py`` and is named here as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

# Tests reach every service through this module, so the shared ones are named here too
# (those marked F401 are not used here).
from tests.loopback import (
    LOOPBACK,
    NODELAY,
    REPO,
    Orthanc,  # noqa: F401
    ServiceProcess,
    c_echo,
    dermpacs_argv,
    free_port,
    port_open,
    redis_available,  # noqa: F401
    redis_database,
    storescu_argv,
    wait_until,
    write_toml,
)
from tests.loopback import redis_url as _redis_url

POSTGRES_ADMIN_URL = os.environ.get(
    "DERMPACS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
# Tests use their own Redis database, and queue names unique to each run on top of it.
REDIS_TEST_DB = int(os.environ.get("DERMPACS_TEST_REDIS_DB", "11"))

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Processes


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
        dermpacs_argv(command, config, *extra_args),
        log_path=log_path,
        env={"PYTHONUNBUFFERED": "1", **(env or {})},
    )


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


def redis_url() -> str:
    """The URL of the tests' Redis database."""
    return _redis_url(REDIS_TEST_DB)


def delete_redis_keys(pattern: str) -> int:
    """Delete the keys of the tests' Redis database that match ``pattern``."""
    client = redis_database(REDIS_TEST_DB)
    keys = list(client.scan_iter(match=pattern))
    return int(client.delete(*keys)) if keys else 0


# ---------------------------------------------------------------------------------------------
# Models for plumbing tests


def write_plumbing_weights(folder: Path) -> dict[str, Any]:
    """Write small randomly initialised networks; return the ``[model]`` settings for them.

    These weights are NOT trained: they exist so that service tests can run photos through
    every stage (decode, segment, crop, classify, SEG/SR/overlay, dispatch) before, or
    independently of, the reference weights. Their findings mean nothing.
    """
    from tests.plumbing_models import write_plumbing_networks

    return write_plumbing_networks(folder)


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
        storescu_argv(
            port, files, called_aet=called_aet, calling_aet=calling_aet, options=[syntax_option]
        ),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **NODELAY},
    )


# ---------------------------------------------------------------------------------------------
# Fault injection: a Redis of a test's own, certificates, bursts of photos, figures


class RedisServer:
    """A ``redis-server`` of one test: its own port, folder and (optional) password and TLS.

    It can be killed (SIGKILL, by PID) and started again on the same port, which the shared
    Redis on 6379 must never be. No persistence by default: a restart forgets every queued
    message, the harshest case for the services above it.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.workdir = workdir
        self.password = password
        self.tls = tls
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.process: ServiceProcess | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The broker URL, without the password (configured separately)."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{LOOPBACK}:{self.port}/0"

    def argv(self) -> list[str]:
        argv = ["redis-server", "--bind", LOOPBACK, "--dir", str(self.workdir)]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        argv += ["--logfile", ""]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls:
            certificate, key, ca = self.tls
            argv += ["--port", "0", "--tls-port", str(self.port)]
            argv += ["--tls-cert-file", str(certificate), "--tls-key-file", str(key)]
            argv += ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        return argv

    def start(self, timeout: float = 20.0) -> RedisServer:
        self.starts += 1
        self.process = ServiceProcess(
            self.argv(), log_path=self.workdir / "redis.log", cwd=self.workdir
        )
        wait_until(lambda: port_open(self.port), timeout=timeout, what="redis-server")
        return self

    def kill(self) -> None:
        """SIGKILL it (a crash: what it held in memory is gone)."""
        if self.process is not None:
            self.process.kill()
            self.process.stop()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def client(self) -> Any:
        import redis

        kwargs: dict[str, Any] = {"password": self.password, "socket_timeout": 5}
        if self.tls:
            kwargs.update(ssl=True, ssl_ca_certs=str(self.tls[2]))
        return redis.Redis(LOOPBACK, self.port, **kwargs)

    def waiting(self, queue: str) -> int:
        """Messages waiting on ``queue``: kombu keeps one list per priority step
        (``inference`` for step 0, ``inference\x06\x16<step>`` for the others)."""
        client = self.client()
        return sum(
            client.llen(key) for key in client.keys(f"{queue}*") if client.type(key) == b"list"
        )


class TlsFiles:
    """A test CA with a server certificate (for 127.0.0.1 and localhost) and a client one.

    Made with ``cryptography`` on the fly: nothing secret lives in the repository.
    """

    def __init__(self, folder: Path) -> None:
        import datetime as dt
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        folder.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)

        def name(common: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

        def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            path.chmod(0o600)
            return path

        def write_cert(cert: x509.Certificate, path: Path) -> Path:
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            return path

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(name("dermpacs test CA"))
            .issuer_name(name("dermpacs test CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )

        def issue(common: str, usage: Any, sans: list[Any]) -> tuple[Any, Any]:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(name(common))
                .issuer_name(ca.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            )
            if sans:
                builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            return key, builder.sign(ca_key, hashes.SHA256())

        server_key, server = issue(
            "dermpacs test server",
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))],
        )
        client_key, client = issue("CAMERA", ExtendedKeyUsageOID.CLIENT_AUTH, [])
        self.ca = write_cert(ca, folder / "ca.pem")
        self.server_certificate = write_cert(server, folder / "server.pem")
        self.server_key = write_key(server_key, folder / "server.key")
        self.client_certificate = write_cert(client, folder / "client.pem")
        self.client_key = write_key(client_key, folder / "client.key")
        # A second CA nobody trusts, for "wrong CA" checks.
        stranger_key = ec.generate_private_key(ec.SECP256R1())
        stranger = (
            x509.CertificateBuilder()
            .subject_name(name("stranger CA"))
            .issuer_name(name("stranger CA"))
            .public_key(stranger_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(stranger_key, hashes.SHA256())
        )
        self.stranger_ca = write_cert(stranger, folder / "stranger-ca.pem")

    @property
    def server(self) -> tuple[Path, Path, Path]:
        """(certificate, private key, CA) of the server side."""
        return self.server_certificate, self.server_key, self.ca


def clone_photos(template: Path, folder: Path, count: int, *, prefix: str = "photo") -> list[Path]:
    """``count`` copies of a camera photo, each a new instance in its own new study.

    The camera's bytes (JPEG) are kept; only the UIDs change, so that every copy is a photo
    of its own with its own results.
    """
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    source = dcmread(template)
    paths = []
    for i in range(count):
        source.StudyInstanceUID = generate_uid()
        source.SeriesInstanceUID = generate_uid()
        source.SOPInstanceUID = generate_uid()
        source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
        path = folder / f"{prefix}{i:04d}.dcm"
        source.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send_photos(
    port: int,
    files: Sequence[Path],
    *,
    associations: int = 1,
    called_aet: str = "DERMPACS",
    calling_aet: str = "CAMERA",
    on_status: Callable[[Path, int | None], None] | None = None,
    tls: Any = None,
) -> dict[Path, int | None]:
    """Send ``files`` over ``associations`` parallel associations, as several cameras would.

    Returns each file's C-STORE status, or None when it got no answer (the association was
    refused, aborted or lost before the response). ``on_status`` is called after each
    answer (from the sender threads). ``tls``: a ``(ssl_context, server_hostname)`` pair.
    A thread whose association is lost stops: its remaining files are left unanswered, for
    the caller to send again, as a camera would.
    """
    import threading

    from pydicom import dcmread
    from pynetdicom import AE

    statuses: dict[Path, int | None] = dict.fromkeys(files)
    lock = threading.Lock()

    def one_association(chunk: Sequence[Path]) -> None:
        if not chunk:
            return
        datasets = [(path, dcmread(path)) for path in chunk]
        ae = AE(ae_title=calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        contexts = sorted(
            {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}
        )
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, [syntax])
        try:
            assoc = ae.associate(LOOPBACK, port, ae_title=called_aet, tls_args=tls)
        except Exception:
            return
        if not assoc.is_established:
            return
        try:
            for path, ds in datasets:
                try:
                    response = assoc.send_c_store(ds)
                except Exception:
                    break
                status = int(response.Status) if "Status" in response else None
                with lock:
                    statuses[path] = status
                if on_status is not None:
                    on_status(path, status)
                if status is None or not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()

    chunks = [list(files[i::associations]) for i in range(associations)]
    in_threads(one_association, chunks, timeout=600)
    return statuses


def in_threads(target: Callable[[Any], None], arguments: Sequence[Any], *, timeout: float) -> None:
    """Call ``target(a)`` for each ``a`` of ``arguments``, each in its own thread, all at once;
    return when all have ended (or ``timeout`` seconds per thread have passed)."""
    import threading

    threads = [threading.Thread(target=target, args=(argument,)) for argument in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


def record_figures(name: str, figures: Mapping[str, Any]) -> None:
    """Print a test's figures, and keep them as JSON under ``$DERMPACS_FIGURES_DIR``."""
    line = json.dumps({"test": name, **figures}, default=str)
    print(f"FIGURES {line}")
    folder = os.environ.get("DERMPACS_FIGURES_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(
            json.dumps({"test": name, **figures}, indent=2, default=str) + "\n"
        )


class BlackHole:
    """A TCP port that accepts connections and never says a word: a peer that hangs."""

    def __init__(self) -> None:
        import threading

        self.port = free_port()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((LOOPBACK, self.port))
        self._sock.listen(64)
        self._held: list[socket.socket] = []
        self._stopped = False
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)

    def close(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in self._held:
            with contextlib.suppress(OSError):
                conn.close()


def jobs_command(config: Path, *args: str) -> Any:
    """``dermpacs jobs --config CONFIG ARGS... --json`` as an admin runs it; its JSON answer."""
    done = subprocess.run(
        [*dermpacs_argv("jobs", config, *args), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def open_job_store(url: str) -> Any:
    """A job store on ``url`` for a test to read (and, for an admin step, write)."""
    from dermpacs.jobs.store import JobStore, make_engine

    return JobStore(make_engine(url, pool_size=2), actor="test")


class Stack:
    """dermpacs as a hospital runs it, for fault tests: listener and worker processes,
    a Redis of the test's own, a job store, and one or more PACS.

    Settings are written to ``tmp_path/dermpacs.toml``; ``overrides`` replace sections or
    keys. The networks are plumbing weights (fast; these tests are about the plumbing).
    """

    def __init__(
        self,
        tmp_path: Path,
        *,
        model: Mapping[str, Any],
        database_url: str,
        broker: RedisServer | None,
        destinations: list[dict[str, Any]],
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.root = tmp_path / "var"
        self.database_url = database_url
        self.broker = broker
        tree: dict[str, Any] = {
            "listener": {"ae_title": "DERMPACS", "host": LOOPBACK, "port": self.port},
            "broker": {"url": broker.url if broker else ""},
            "storage": {"root": str(self.root), "min_free_mb": 0},
            "database": {"url": database_url},
            "model": dict(model),
            # One crop per photo: a smaller SR, so that bursts of 100 process in seconds.
            "crops": {"max_crops": 1},
            "queues": {
                "inference": {
                    "name": "inference",
                    "concurrency": 1,
                    "time_limit": 60,
                    "retry_delay": 0.5,
                    "retry_delay_max": 4.0,
                },
                "dispatch": {
                    "name": "dispatch",
                    "concurrency": 1,
                    "time_limit": 60,
                    "retry_delay": 0.5,
                    "retry_delay_max": 4.0,
                },
            },
            "jobs": {
                "reconcile_interval": 2.0,
                "received_grace": 2.0,
                "dispatch_grace": 5.0,
                "lease_timeout": 6.0,
            },
            "dispatch": {"acse_timeout": 5.0, "dimse_timeout": 20.0, "network_timeout": 10.0},
            "destinations": destinations,
        }
        for section, values in (overrides or {}).items():
            if isinstance(values, Mapping) and isinstance(tree.get(section), dict):
                tree[section] = {**tree[section], **values}
            else:
                tree[section] = values
        self.tree = tree
        self.config = write_toml(tmp_path / "dermpacs.toml", tree)
        self.listeners: list[ServiceProcess] = []
        self.workers: list[ServiceProcess] = []
        self.env: dict[str, str] = {}

    @property
    def processes(self) -> list[ServiceProcess]:
        return self.listeners + self.workers

    def start_listener(self, timeout: float = 60.0) -> ServiceProcess:
        index = len(self.listeners)
        listener = dermpacs_process(
            "listen", self.config, log_path=self.tmp_path / f"listen{index}.log", env=self.env
        )
        self.listeners.append(listener)
        allowed = self.tree["listener"].get("allowed_calling_aets") or ["ECHOSCU"]
        self.wait(
            lambda: c_echo(self.port, called_aet="DERMPACS", calling_aet=allowed[0]),
            timeout=timeout,
            what="listener",
        )
        return listener

    def start_worker(self, *args: str, timeout: float = 90.0) -> ServiceProcess:
        """Start ``dermpacs worker ARGS...`` and wait until it is ready."""
        index = len(self.workers)
        log = self.tmp_path / f"worker{index}.log"
        worker = dermpacs_process(
            "worker", self.config, log_path=log, env=self.env, extra_args=args
        )
        self.workers.append(worker)
        self.wait(lambda: "ready." in worker.log(), timeout=timeout, what="worker")
        return worker

    def wait(self, probe: Callable[[], T | None], *, timeout: float, what: str) -> T:
        """:func:`wait_until`, and on time-out the tails of the logs in the error."""
        try:
            return wait_until(probe, timeout=timeout, interval=0.25, what=what)
        except TimeoutError as exc:
            tails = "\n".join(
                f"--- {p.log_path.name} ---\n{p.log()[-3000:]}" for p in self.processes
            )
            raise TimeoutError(f"{exc}\n{tails}") from None

    def logs(self) -> str:
        """Everything every dermpacs process of this stack wrote."""
        return "\n".join(p.log() for p in self.processes)

    def store(self) -> Any:
        """The stack's job store (the SQLite file under the storage root when no URL)."""
        url = self.database_url or f"sqlite:///{(self.root / 'jobs.sqlite3').resolve()}"
        return open_job_store(url)

    def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(Exception):
                process.stop(timeout=30)


def dicom_file_bytes(
    body: bytes, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
) -> bytes:
    """A DICOM file around ``body`` (a data set's bytes, well formed or not): preamble,
    ``DICM`` and a valid file meta group naming the class, instance and syntax."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return bytes(out.getvalue()) + body


def send_raw(
    port: int,
    body: bytes,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    folder: Path,
    calling_aet: str = "CAMERA",
    called_aet: str = "DERMPACS",
) -> tuple[int | None, str]:
    """C-STORE ``body`` exactly as given (no parsing, no re-encoding) over a new association.

    pynetdicom streams a file's bytes after its meta group when
    ``STORE_SEND_CHUNKED_DATASET`` is on: what a broken or hostile sender puts on the wire.
    Returns the status (None if none came) and what happened, in words.
    """
    from pynetdicom import AE, _config

    path = folder / f"raw-{uuid.uuid4().hex[:8]}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        dicom_file_bytes(
            body,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
        )
    )
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(sop_class_uid, [transfer_syntax_uid])
    # Verification too, so that the association stands when the listener rejects the
    # storage context (pynetdicom aborts an association without any accepted context).
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(LOOPBACK, port, ae_title=called_aet)
    if not assoc.is_established:
        return None, "association rejected" if assoc.is_rejected else "association failed"
    try:
        if not any(c.abstract_syntax == sop_class_uid for c in assoc.accepted_contexts):
            return None, "presentation context rejected (nothing sent)"
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            response = assoc.send_c_store(path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
        if "Status" not in response:
            return None, "no response"
        comment = str(response.get("ErrorComment", ""))
        return int(response.Status), comment
    finally:
        if assoc.is_established:
            assoc.release()
