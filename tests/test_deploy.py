"""The deployment files under deploy/, checked as far as this machine allows.

No container runtime or cluster runs here, so each file is parsed and checked for what would
break a deployment: every ``dermpacs`` command line parses with the real CLI, every
configuration (file plus ``DERMPACS__*`` variables) validates with the real settings model,
names that must agree across files agree (queues, ports, services, labels, secrets), GPU
workers ask for a GPU, and the systemd units pass ``systemd-analyze verify`` where it exists.
"""

from __future__ import annotations

import configparser
import importlib
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from dermpacs.cli import COMMANDS, _command_parser
from dermpacs.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
KUBERNETES = DEPLOY / "kubernetes"
INSTALLED_BIN = "/opt/dermpacs/venv/bin/"


def parse_dermpacs_command(argv: list[str]) -> Any:
    """Parse ``argv`` (after ``dermpacs``) with the real command's parser; fail if it does not."""
    assert argv, "empty dermpacs command"
    name, rest = argv[0], argv[1:]
    assert name in COMMANDS, f"unknown dermpacs command {name!r}"
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return _command_parser(name, module).parse_args(rest)
    except SystemExit as exc:  # argparse's way of saying no
        raise AssertionError(f"`dermpacs {' '.join(argv)}` does not parse") from exc


def settings_from(environ: dict[str, str], toml_text: str | None = None, tmp: Path | None = None):
    """The settings a process would get from a configuration file and its environment."""
    path = None
    if toml_text is not None:
        assert tmp is not None
        path = tmp / "dermpacs.toml"
        path.write_text(toml_text)
    return load_settings(path, environ=environ)


# ---------------------------------------------------------------------------------------------
# systemd


def read_unit(path: Path) -> tuple[configparser.ConfigParser, list[tuple[str, str, str]]]:
    """The unit as sections, and every ``key=value`` line in order (keys may repeat)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    lines = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        lines.append((section, key.strip(), value.strip()))
    return parser, lines


UNITS = sorted(SYSTEMD.glob("*.service"))


def test_every_role_has_a_unit() -> None:
    names = {p.name for p in SYSTEMD.iterdir()}
    assert {
        "dermpacs-listener.service",
        "dermpacs-worker@.service",
        "dermpacs-dispatch.service",
        "dermpacs-admin.service",
        "dermpacs-flower.service",
        "dermpacs.target",
    } <= names


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_runs_a_valid_command_as_the_service_user(unit: Path) -> None:
    parser, lines = read_unit(unit)
    assert parser["Unit"]["Description"]
    service = parser["Service"]
    assert service["User"] == "dermpacs" and service["Group"] == "dermpacs"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert parser["Install"]["WantedBy"] == "dermpacs.target"
    argv = shlex.split(service["ExecStart"])
    assert argv[0].startswith(INSTALLED_BIN)
    if argv[0].endswith("/dermpacs"):
        parse_dermpacs_command(argv[1:])
        environment = [v for s, k, v in lines if s == "Service" and k == "Environment"]
        assert "DERMPACS_CONFIG=/etc/dermpacs/dermpacs.toml" in environment
        assert "/var/lib/dermpacs" in service["ReadWritePaths"]
    else:  # Flower on the broker dermpacs uses
        assert argv[0].endswith("/celery") and "flower" in argv
        assert "--broker=${FLOWER_BROKER}" in argv


def test_gpu_worker_unit_pins_one_gpu_per_instance() -> None:
    parser, lines = read_unit(SYSTEMD / "dermpacs-worker@.service")
    environment = [v for s, k, v in lines if s == "Service" and k == "Environment"]
    assert "CUDA_VISIBLE_DEVICES=%i" in environment
    assert "DERMPACS__MODEL__DEVICE=cuda:0" in environment
    args = parse_dermpacs_command(shlex.split(parser["Service"]["ExecStart"])[1:])
    assert args.queues == "inference" and args.concurrency == 1
    # Celery's warm shutdown must be allowed to outlast the longest task.
    assert int(parser["Service"]["TimeoutStopSec"]) > Settings().queues.inference.time_limit
    settings = load_settings(environ={"DERMPACS__MODEL__DEVICE": "cuda:0"})
    assert settings.model.device == "cuda:0"


def test_target_wants_the_host_services() -> None:
    parser, _ = read_unit(SYSTEMD / "dermpacs.target")
    wanted = set(parser["Unit"]["Wants"].split())
    assert wanted == {
        "dermpacs-listener.service",
        "dermpacs-dispatch.service",
        "dermpacs-admin.service",
        "dermpacs-flower.service",
    }


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` with the install prefix pointed at this checkout's venv
    (it checks that executables exist) and the optional Flower environment file."""
    venv_bin = Path(importlib.import_module("sys").executable).parent
    if not (venv_bin / "dermpacs").exists() or not (venv_bin / "celery").exists():
        pytest.skip("the dermpacs and celery scripts are not installed beside this Python")
    for unit in SYSTEMD.iterdir():
        text = unit.read_text().replace(INSTALLED_BIN, f"{venv_bin}/")
        text = text.replace("EnvironmentFile=/etc/", "EnvironmentFile=-/etc/")
        name = unit.name.replace("@.service", "@0.service")
        (tmp_path / name).write_text(text)
    units = sorted(str(p) for p in tmp_path.iterdir())
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        done.stdout + done.stderr
    )


# ---------------------------------------------------------------------------------------------
# Docker


def test_dockerfile_builds_from_repository_files() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) == 2 and all("python:3.11" in line for line in froms)
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"COPY source {source} is not in the repo"
    assert 'ENTRYPOINT ["tini", "--", "dermpacs"]' in lines
    assert any(line.startswith("USER dermpacs") for line in lines)
    exposed = {int(p) for line in lines if line.startswith("EXPOSE ") for p in line.split()[1:]}
    defaults = Settings()
    assert {defaults.listener.port, defaults.admin.port, 5555} <= exposed
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert "[flower]" in " ".join(lines) and any(d.startswith("flower") for d in extras["flower"])


def _substitute(value: str, sample: dict[str, str]) -> str:
    """Compose's ``${NAME:?message}`` / ``${NAME}`` interpolation with sample values."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in sample, f"no sample value for ${{{name}}}"
        return sample[name]

    return re.sub(r"\$\{([A-Z0-9_]+)(?::[?-][^}]*)?\}", one, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def compose_env_sample() -> dict[str, str]:
    """The variables of deploy/compose/example.env, as compose reads a single-quoted .env."""
    sample = {}
    for line in (DEPLOY / "compose" / "example.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            sample[key.strip()] = value.strip().strip("'")
    return sample


def dermpacs_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image") == "dermpacs:latest"
    }


def test_compose_has_every_part(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "redis",
        "postgres",
        "orthanc",
        "listener",
        "worker-gpu0",
        "dispatch",
        "admin",
        "flower",
    }
    for name in ("redis", "postgres"):
        assert compose["services"][name]["healthcheck"]["test"]
    assert set(compose["volumes"]) >= {"redis-data", "postgres-data", "dermpacs-data"}
    build = compose["services"]["listener"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile"
    ).resolve()


def test_compose_commands_and_configuration_are_valid(
    compose: dict[str, Any], compose_env_sample: dict[str, str], tmp_path: Path
) -> None:
    services = dermpacs_services(compose)
    assert set(services) == {"listener", "worker-gpu0", "dispatch", "admin", "flower"}
    default_toml = (REPO / "config" / "dermpacs.toml").read_text()  # what the image holds
    for name, service in services.items():
        environment = {
            key: _substitute(str(value), compose_env_sample)
            for key, value in service["environment"].items()
        }
        settings = settings_from(environment, default_toml, tmp_path)
        assert settings.broker.url == "redis://redis:6379/0", name
        assert settings.database.url.startswith("postgresql://dermpacs:"), name
        assert [d.host for d in settings.destinations] == ["orthanc"]
        assert "redis" in service["depends_on"], name
        if name == "flower":
            assert service["entrypoint"] == ["tini", "--", "celery"]
            assert f"--broker={settings.broker.url}" in service["command"]
            continue
        args = parse_dermpacs_command(service["command"])
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        if name == "listener":
            assert f"{settings.listener.port}:{settings.listener.port}" in service["ports"]
        if name == "admin":
            assert settings.admin.users and settings.admin.tokens
            assert (
                args.host == "0.0.0.0"
                and f"127.0.0.1:{args.port}:{args.port}" in (service["ports"])
            )
            assert "/healthz" in " ".join(service["healthcheck"]["test"])


def test_compose_gpu_worker_reserves_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker-gpu0"]
    args = parse_dermpacs_command(worker["command"])
    assert args.queues == "inference" and args.concurrency == 1
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["device_ids"] == ["0"]
    assert worker["environment"]["DERMPACS__MODEL__DEVICE"] == "cuda:0"


def test_compose_orthanc_matches_the_destination(compose: dict[str, Any]) -> None:
    orthanc = json.loads((DEPLOY / "compose" / "orthanc.json").read_text())
    environment = dermpacs_services(compose)["listener"]["environment"]
    (destination,) = json.loads(environment["DERMPACS__DESTINATIONS"])
    assert destination["ae_title"] == orthanc["DicomAet"]
    assert destination["port"] == orthanc["DicomPort"]
    mounts = compose["services"]["orthanc"]["volumes"]
    assert any(m.startswith("./compose/orthanc.json:") for m in mounts)


# ---------------------------------------------------------------------------------------------
# Kubernetes


def kubernetes_objects() -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k`` would send: ``kubectl kustomize`` when kubectl is
    here, else the listed resources read directly (the namespace set by hand)."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    if shutil.which("kubectl"):
        done = subprocess.run(
            ["kubectl", "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return [o for o in yaml.safe_load_all(done.stdout) if o]
    objects = []
    for resource in kustomization["resources"]:
        for obj in yaml.safe_load_all((KUBERNETES / resource).read_text()):
            if obj and obj["kind"] != "Namespace":
                obj["metadata"]["namespace"] = kustomization["namespace"]
            if obj:
                objects.append(obj)
    return objects


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    objects = kubernetes_objects()
    by_key = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(by_key) == len(objects), "two objects of the same kind and name"
    return by_key


@pytest.fixture(scope="module")
def k8s_secret() -> dict[str, str]:
    secret = yaml.safe_load((KUBERNETES / "secret.example.yaml").read_text())
    return dict(secret["stringData"])


def deployments(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: o for (kind, name), o in k8s.items() if kind == "Deployment"}


def test_kustomization_lists_existing_files_and_every_part(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).is_file()
    assert "secret.example.yaml" not in kustomization["resources"]  # never placeholders
    assert set(deployments(k8s)) == {
        "dermpacs-listener",
        "dermpacs-worker-gpu",
        "dermpacs-dispatch",
        "dermpacs-admin",
        "dermpacs-flower",
    }
    assert ("StatefulSet", "redis") in k8s and ("ScaledObject", "dermpacs-worker-gpu") in k8s
    for (kind, _), obj in k8s.items():
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == "dermpacs"


def test_kubernetes_pods_run_valid_commands_with_valid_configuration(
    k8s: dict[tuple[str, str], dict[str, Any]], k8s_secret: dict[str, str], tmp_path: Path
) -> None:
    toml_text = k8s[("ConfigMap", "dermpacs-config")]["data"]["dermpacs.toml"]
    for name, deployment in deployments(k8s).items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (container,) = pod["containers"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, (name, mount)
        environment = {}
        for variable in container.get("env", []):
            if "valueFrom" in variable:
                ref = variable["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "dermpacs" and ref["key"] in k8s_secret, (name, ref)
                environment[variable["name"]] = k8s_secret[ref["key"]]
            else:
                environment[variable["name"]] = variable["value"]
        if name == "dermpacs-flower":
            assert container["command"] == ["tini", "--", "celery"]
            assert "--broker=redis://redis:6379/0" in container["args"]
            continue
        assert environment.pop("DERMPACS_CONFIG") == "/etc/dermpacs/dermpacs.toml"
        settings = settings_from(environment, toml_text, tmp_path)
        assert settings.database.url.startswith("postgresql://")
        assert settings.broker.url == "redis://redis:6379/0"
        assert Path(settings.storage.root) == Path("/var/lib/dermpacs")
        args = parse_dermpacs_command(container["args"])
        if name == "dermpacs-admin":
            assert settings.admin.users and settings.admin.tokens
            port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
            assert port == settings.admin.port and settings.admin.host == "0.0.0.0"
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert settings.admin.listener_host == "dermpacs-listener"
        if name == "dermpacs-listener":
            port = {p["name"]: p["containerPort"] for p in container["ports"]}["dicom"]
            assert port == settings.listener.port
        if name == "dermpacs-worker-gpu":
            assert args.queues == settings.queues.inference.name
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert settings.model.device == "cuda:0"
            assert pod["terminationGracePeriodSeconds"] > settings.queues.inference.time_limit


def test_kubernetes_services_reach_their_pods(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    pods = {name: o["spec"]["template"] for name, o in deployments(k8s).items()}
    pods["redis"] = k8s[("StatefulSet", "redis")]["spec"]["template"]
    for (kind, name), service in k8s.items():
        if kind != "Service":
            continue
        selector = service["spec"]["selector"]
        matches = [
            template
            for template in pods.values()
            if selector.items() <= template["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, name
        port_names = {
            p["name"] for c in matches[0]["spec"]["containers"] for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (name, port)


def test_keda_scales_gpu_workers_on_the_inference_list(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    scaled = k8s[("ScaledObject", "dermpacs-worker-gpu")]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert ("Deployment", scaled["spec"]["scaleTargetRef"]["name"]) in k8s
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    settings = Settings.model_validate(
        tomllib.loads(k8s[("ConfigMap", "dermpacs-config")]["data"]["dermpacs.toml"])
    )
    assert trigger["metadata"]["listName"] == settings.queues.inference.name
    host, port = trigger["metadata"]["address"].split(":")
    assert host.split(".")[:2] == ["redis", "dermpacs"] and ("Service", "redis") in k8s
    assert settings.broker.url.endswith(f"redis:{port}/{trigger['metadata']['databaseIndex']}")
    assert int(trigger["metadata"]["listLength"]) >= 1
