"""The ``dermpacs send`` and ``dermpacs jobs`` commands."""

from __future__ import annotations

import getpass
import json
import sqlite3

import pytest

from dermpacs.cli import main
from dermpacs.jobs import JobStore, ReceivedInstance
from dermpacs.jobs.models import JobState
from tests import services
from tests.test_intake_admission import encode, photo


@pytest.fixture
def config(tmp_path):
    return services.write_toml(
        tmp_path / "dermpacs.toml",
        {
            "storage": {"root": str(tmp_path / "var")},
            "destinations": [{"name": "outbox", "kind": "folder"}],
        },
    )


def test_send_to_a_folder_destination_is_refused(config, tmp_path, capsys):
    path = tmp_path / "p.dcm"
    path.write_bytes(encode(photo()))
    assert main(["send", "--config", str(config), str(path), "--to", "outbox"]) == 2
    assert "is a folder, not dicom" in capsys.readouterr().out


def test_send_to_a_closed_port_exits_1(config, tmp_path, capsys):
    path = tmp_path / "p.dcm"
    path.write_bytes(encode(photo()))
    port = str(services.free_port())
    argv = ["send", "--config", str(config), str(path), "--host", "127.0.0.1", "--port", port]
    assert main([*argv, "--aet", "NOBODY", "--json"]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["stored"] is False


@pytest.mark.integration
def test_send_a_folder_of_files_to_orthanc(config, tmp_path, orthanc, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.dcm").write_bytes(encode(photo()))
    argv = ["send", "--config", str(config), str(folder), "--host", "127.0.0.1"]
    argv += ["--port", str(orthanc.dicom_port), "--aet", orthanc.aet]
    assert main(argv) == 0
    assert "3 of 3 stored" in capsys.readouterr().out
    assert orthanc.count_instances() == 3


def test_jobs_list_show_and_retry(config, tmp_path, capsys):
    from dermpacs.config import load_settings

    settings = load_settings(config, environ={})
    store = JobStore.from_settings(settings)
    job_id = store.record_received(
        ReceivedInstance(
            "1.2",
            "1.2.1",
            "1.2.1.1",
            "1.2.840.10008.5.1.4.1.1.7",
            "1.2.840.10008.1.2.1",
            "CAM1",
            "/s/1",
        ),
        model_version="m",
    ).job_id
    store.fail(job_id, "PACS unreachable for a day")
    store.dispose()

    assert main(["jobs", "--config", str(config), "list", "--state", "failed", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["id"] == job_id and listed["last_error"] == "PACS unreachable for a day"

    assert main(["jobs", "--config", str(config), "retry", str(job_id)]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id}: processing again"
    # the task is on the embedded broker, as a JSON message with the job id only
    broker = sqlite3.connect(tmp_path / "var" / "broker.sqlite3")
    (payload,) = [row[0] for row in broker.execute("select payload from kombu_message")]
    message = json.loads(payload)
    assert message["headers"]["task"] == "dermpacs.process_job"
    assert message["content-type"] == "application/json"

    assert main(["jobs", "--config", str(config), "show", str(job_id), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == JobState.QUEUED.value
    assert [(e["to_state"], e["actor"]) for e in shown["events"]][-2:] == [
        ("received", f"admin@cli:{getpass.getuser()}"),
        ("queued", f"admin@cli:{getpass.getuser()}"),
    ]
    assert main(["jobs", "--config", str(config), "retry", str(job_id)]) == 1
    assert "only a failed or cancelled job can be retried" in capsys.readouterr().out
    assert main(["jobs", "--config", str(config), "show", "999"]) == 1


def test_quiet_libraries_unbinds_pynetdicoms_log_formatting_unless_verbose(monkeypatch):
    """Unless verbose, associations made after quiet_libraries carry none of pynetdicom's
    standard handlers (which format every PDU and message for a log that drops them)."""
    import logging

    from pydicom import config as pydicom_config
    from pynetdicom import AE, _config, evt
    from pynetdicom.association import Association

    from dermpacs.commands.listen import quiet_libraries

    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", _config.LOG_HANDLER_LEVEL)
    for name in ("reading_validation_mode", "writing_validation_mode"):
        monkeypatch.setattr(pydicom_config.settings, name, getattr(pydicom_config.settings, name))
    for name in ("pynetdicom", "highdicom", "pydicom"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)

    def bound(event):
        return Association(AE(), "acceptor").get_handlers(event)

    quiet_libraries(verbose=True)
    assert bound(evt.EVT_PDU_RECV) and bound(evt.EVT_DIMSE_SENT)
    quiet_libraries(verbose=False)
    assert bound(evt.EVT_PDU_RECV) == [] and bound(evt.EVT_DIMSE_RECV) == []
    assert logging.getLogger("pynetdicom").level == logging.WARNING
