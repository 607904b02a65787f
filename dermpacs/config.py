"""Typed settings: embedded defaults, a TOML file, then ``DERMPACS__SECTION__KEY`` variables.

One place for configuration. Every command loads it with :func:`load_settings`; an unknown or
ill-typed key stops start-up with an error that names the key.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "DERMPACS__"
CONFIG_ENV = "DERMPACS_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ListenerSettings(_Section):
    ae_title: str = "DERMPACS"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    max_associations: int = Field(16, ge=1)  # shared by the `processes`
    # Processes serving associations behind the one port: the listening process hands each
    # accepted connection to the one serving the fewest (dermpacs.intake.receivers).
    processes: int = Field(1, ge=1, le=64)
    max_pdu_size: int = Field(0, ge=0)  # 0: no limit (PS3.8 D.3.3.2.1)
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    # Refuse associations addressed to another AE title (PS3.8 7.1.1.4).
    require_called_aet: bool = True
    # IP addresses or networks (CIDR) allowed to connect; empty: any. Checked on connect.
    allowed_hosts: list[str] = Field(default_factory=list)
    # DICOM over TLS (PS3.15 B.1) on a second port beside the plain one; 0: none.
    tls_port: int = Field(0, ge=0, le=65535)
    tls_only: bool = False  # no plain port: only tls_port listens
    tls_certificate: str = ""  # PEM certificate chain of the listener
    tls_private_key: str = ""  # PEM private key (a file; never in this configuration)
    tls_ca_certificates: str = ""  # set: callers must present a certificate signed by these

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        if not 0 < len(value) <= 16:
            raise ValueError("an AE title has 1 to 16 characters (PS3.5 6.2)")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not an IP address or network") from exc
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> ListenerSettings:
        if self.tls_port and not (self.tls_certificate and self.tls_private_key):
            raise ValueError("tls_port needs tls_certificate and tls_private_key")
        if self.tls_only and not self.tls_port:
            raise ValueError("tls_only needs tls_port")
        return self


class BrokerSettings(_Section):
    url: str = ""  # empty: the embedded broker under storage.root
    visibility_timeout: int = Field(3600, ge=5)
    password_file: str = ""  # a file holding the Redis password (put into the URL at start)
    tls_ca_certificates: str = ""  # rediss://: CA bundle that signed the Redis certificate
    tls_certificate: str = ""  # rediss://: our client certificate, when Redis asks for one
    tls_private_key: str = ""


class StorageSettings(_Section):
    root: Path = Path("var/dermpacs")
    min_free_mb: int = Field(100, ge=0)  # below this, C-STORE answers 0xA700


# Celery's rate limit strings (celery.utils.time.rate): "N", "N/s", "N/m", "N/h".
RATE_LIMIT_PATTERN = re.compile(r"^\d+(\.\d+)?(/[smh])?$")


class QueueSettings(_Section):
    """One Celery queue and the policy of the tasks on it."""

    name: str = Field(min_length=1)
    concurrency: int = Field(1, ge=1)  # worker processes of `dermpacs worker` for this queue
    time_limit: int = Field(600, ge=10)  # seconds; a task running longer is killed
    max_attempts: int = Field(3, ge=1)
    retry_delay: float = Field(10.0, ge=0)  # first retry after this; doubles, with jitter
    retry_delay_max: float = Field(600.0, ge=0)
    # Celery rate limit of the queue's task per worker ("10/m", "2/s", "100/h"); empty: none.
    rate_limit: str = ""

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        value = value.strip()
        if value and not RATE_LIMIT_PATTERN.match(value):
            raise ValueError(
                f"{value!r} is not a Celery rate limit: a number of tasks per second, "
                'or per s, m or h ("10/m")'
            )
        return value


class PriorityRule(_Section):
    """Choose a priority level for a received photo; every condition given must match.

    Patterns are shell globs (``*``, ``?``, ``[...]``), matched case-sensitively against the
    value without its padding; a tag with several values matches when any value does.
    """

    level: str = Field(min_length=1)
    calling_ae_title: str = ""  # glob on the camera's (caller's) AE title; empty: any
    sop_class_uid: str = ""  # glob on the SOP Class UID; empty: any
    tags: dict[str, str] = Field(default_factory=dict)  # DICOM keyword = glob

    @field_validator("tags")
    @classmethod
    def _check_keywords(cls, value: dict[str, str]) -> dict[str, str]:
        from pydicom.datadict import dictionary_VR, tag_for_keyword

        for keyword in value:
            tag = tag_for_keyword(keyword)
            if tag is None:
                raise ValueError(f"{keyword!r} is not a DICOM keyword (PS3.6)")
            # "OB or OW" for Pixel Data and the like
            if set(dictionary_VR(tag).split(" or ")) & {
                "SQ",
                "OB",
                "OW",
                "OF",
                "OD",
                "OL",
                "OV",
                "UN",
            }:
                raise ValueError(f"{keyword!r} is not a text or number attribute")
        return value


class QueuesSettings(_Section):
    inference: QueueSettings = Field(
        default_factory=lambda: QueueSettings(name="inference", concurrency=1, time_limit=600)
    )
    dispatch: QueueSettings = Field(
        default_factory=lambda: QueueSettings(
            name="dispatch", concurrency=2, time_limit=300, max_attempts=20
        )
    )
    # Priority levels and their broker priority, 0 to 9: a LOWER number is served first
    # (kombu's Redis transport and the embedded broker both order this way).
    priorities: dict[str, int] = Field(
        default_factory=lambda: {"urgent": 0, "normal": 5, "off-peak": 9}
    )
    default_priority: str = "normal"  # the level of a photo that no rule matches
    rules: list[PriorityRule] = Field(default_factory=list)  # first match wins

    @field_validator("priorities")
    @classmethod
    def _check_priorities(cls, value: dict[str, int]) -> dict[str, int]:
        if not value:
            raise ValueError("at least one priority level is needed")
        for name, number in value.items():
            if not 0 <= number <= 9:
                raise ValueError(f"{name} = {number}: a broker priority is 0 to 9")
        return value

    @model_validator(mode="after")
    def _check_levels(self) -> QueuesSettings:
        levels = ", ".join(self.priorities)
        if self.default_priority not in self.priorities:
            raise ValueError(
                f"default_priority: {self.default_priority!r} is not a level of "
                f"queues.priorities ({levels})"
            )
        for index, rule in enumerate(self.rules):
            if rule.level not in self.priorities:
                raise ValueError(
                    f"rules[{index}].level: {rule.level!r} is not a level of "
                    f"queues.priorities ({levels})"
                )
        return self

    def broker_priority(self, level: str) -> int:
        """The broker priority of ``level``; the default level's for an unknown one (a job
        recorded under a level that the configuration no longer has)."""
        return self.priorities.get(level, self.priorities[self.default_priority])


class JobsSettings(_Section):
    reconcile_interval: float = Field(30.0, gt=0)  # seconds between reconciler passes
    # A job (or delivery) whose holder has not renewed it for this long is taken over; holders
    # renew every third of it while they work.
    lease_timeout: float = Field(60.0, ge=1)
    received_grace: float = Field(60.0, ge=0)  # a received job this old never reached the broker
    dispatch_grace: float = Field(300.0, ge=0)  # a due delivery this overdue lost its message


class DispatchSettings(_Section):
    calling_ae_title: str = "DERMPACS"
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(120.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    max_pdu_size: int = Field(0, ge=0)
    give_up_after: float = Field(86400.0, gt=0)  # seconds after receipt; then the job fails


class DatabaseSettings(_Section):
    url: str = ""  # empty: SQLite under storage.root
    password_file: str = ""  # a file holding the database password (put into the URL)


class IntakeSettings(_Section):
    max_megapixels: float = Field(60.0, gt=0)
    # Refused and unprocessable photos are kept under storage.root/quarantine with the
    # reason, up to this much; 0 keeps none.
    quarantine_max_mb: int = Field(1024, ge=0)


class ModelSettings(_Section):
    segmentation_weights: str = ""  # empty: the reference weights shipped in the package
    classifier_weights: str = ""
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # auto: ONNX Runtime on the CPU when onnxruntime imports, PyTorch on CUDA; torch; onnx (CPU)
    runtime: Literal["auto", "torch", "onnx"] = "auto"
    long_side: int = Field(512, ge=64)
    # Segmentation input from the codec's reduced-scale (DCT) decode of 8-bit colour JPEG
    # instead of the full decode resized. Off: no faster on a CPU here (crops still need the
    # full decode) and masks moved on some photos (docs/benchmarks.md, docs/model-card.md).
    reduced_decode: bool = False
    # Photos analysed together by one worker process (dermpacs.inference.batching): tasks
    # running at once (a threads pool, `dermpacs worker --pool threads --concurrency N`) hand
    # their photos to one batched pass, up to batch_size, the first waiting at most
    # batch_wait_ms for others. 1: each photo alone, no waiting.
    batch_size: int = Field(1, ge=1, le=256)
    batch_wait_ms: float = Field(20.0, ge=0, le=10_000)
    classes: list[str] = Field(
        default_factory=lambda: [
            "atopic_dermatitis",
            "mycosis_fungoides",
            "impetigo",
            "herpesvirus_infection",
        ]
    )


class CropSettings(_Section):
    min_skin_fraction: float = Field(0.80, ge=0, le=1)
    min_lesion_fraction: float = Field(0.10, ge=0, le=1)
    window_fractions: list[float] = Field(default_factory=lambda: [0.2, 0.3, 0.45])
    stride_fraction: float = Field(0.25, gt=0, le=1)
    max_crops: int = Field(8, ge=1)
    max_overlap: float = Field(0.3, ge=0, le=1)


class QualitySettings(_Section):
    min_skin_fraction: float = Field(0.05, ge=0, le=1)
    # Noise-corrected variance of the Laplacian at long side 512 (dermpacs.inference.quality
    # explains the calibration); 0 turns the blur check off.
    min_sharpness: float = Field(35.0, ge=0)


ResultObject = Literal["seg", "sr", "overlay"]
ALL_RESULT_OBJECTS: tuple[ResultObject, ...] = ("seg", "sr", "overlay")


class Destination(_Section):
    name: str
    kind: Literal["dicom", "folder"] = "dicom"
    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: int = Field(4242, ge=0, le=65535)
    path: str = ""  # for kind = "folder"; relative paths are under storage.root
    objects: list[ResultObject] = Field(default_factory=lambda: list(ALL_RESULT_OBJECTS))
    # kind = "dicom": DICOM over TLS (PS3.15 B.1); the peer's certificate is checked against
    # tls_ca_certificates (the system's CAs when empty) and host.
    tls: bool = False
    tls_ca_certificates: str = ""
    tls_certificate: str = ""  # our client certificate, for peers that ask for one
    tls_private_key: str = ""


AdminRole = Literal["read", "admin"]


class AdminUser(_Section):
    """A person who signs in to the admin page with HTTP basic auth."""

    name: str = Field(min_length=1)
    # A hash from `dermpacs admin --hash-password` (pbkdf2_sha256$...), or plain text.
    password: str = Field(min_length=8)
    role: AdminRole = "read"


class AdminToken(_Section):
    """A bearer token for scripts and Prometheus (``Authorization: Bearer ...``)."""

    name: str = Field(min_length=1)
    token: str = Field(min_length=16)
    role: AdminRole = "read"


class AdminSettings(_Section):
    """The admin web page (``dermpacs admin``): where it listens and who may use it."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Where the page C-ECHOes the listener; empty: listener.host (loopback for 0.0.0.0).
    listener_host: str = ""
    echo_timeout: float = Field(5.0, gt=0)  # seconds, for listener and destination checks
    inspect_timeout: float = Field(1.0, gt=0)  # seconds to wait for workers to answer
    recent_jobs: int = Field(50, ge=1, le=1000)
    users: list[AdminUser] = Field(default_factory=list)
    tokens: list[AdminToken] = Field(default_factory=list)


class Settings(_Section):
    listener: ListenerSettings = Field(default_factory=ListenerSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    crops: CropSettings = Field(default_factory=CropSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    queues: QueuesSettings = Field(default_factory=QueuesSettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    destinations: list[Destination] = Field(
        default_factory=lambda: [Destination(name="outbox", kind="folder", path="outbox")]
    )

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(cls, value: list[Destination]) -> list[Destination]:
        names = [d.name for d in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"destination names must be unique: {', '.join(repeated)}")
        return value


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


def read_secret_file(path: str, *, key: str) -> str:
    """The secret in ``path`` (its first line, without the line end), for a ``*_file`` key.

    Secrets (passwords) live in files readable by the service only, or in the environment,
    never in the configuration file or the repository.

    Raises
    ------
    ConfigError
        The file cannot be read or its first line is empty; the message names ``key``.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            secret = handle.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc
    if not secret:
        raise ConfigError(f"{key}: {path} is empty")
    return secret


def _set_path(tree: dict[str, Any], keys: list[str], raw: str) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys)}: {key} is not a section")
        node = child
    try:
        value: Any = json.loads(raw)  # numbers, booleans, lists
    except json.JSONDecodeError:
        value = raw
    node[keys[-1]] = value


def _env_overrides(tree: dict[str, Any], environ: dict[str, str]) -> None:
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX):
            keys = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
            if keys:
                _set_path(tree, keys, raw)


def load_settings(
    path: str | Path | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Load settings from ``path`` (or ``$DERMPACS_CONFIG``), then environment overrides.

    Raises
    ------
    ConfigError
        When the file does not parse or a key is unknown or has a bad value.
    """
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(CONFIG_ENV) or None
    tree: dict[str, Any] = {}
    if path:
        try:
            tree = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    _env_overrides(tree, environ)
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration ({path or 'defaults'}): {problems}") from exc
