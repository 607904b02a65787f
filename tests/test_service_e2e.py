"""The service end to end, with real parts on loopback.

* ``dermpacs serve`` on its embedded defaults (no Redis, no PACS): a camera photo sent by
  dcmtk ``storescu`` ends as SEG, SR and overlay in the folder destination.
* ``dermpacs listen`` and ``dermpacs worker`` as separate processes, Redis as the broker,
  PostgreSQL as the job store and Orthanc as the PACS: the results arrive in the photo's study
  in Orthanc and pass ``dciodvfy``; a photo sent twice gives one set of results; ten photos
  sent at once all arrive.

The networks are the shipped reference weights when they exist; otherwise small randomly
initialised ones (plumbing: the findings mean nothing, every stage still runs).
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dermpacs.processing import weights_paths
from tests import services
from tests.dicomcheck import dciodvfy_errors
from tests.photos import make_img2dcm_photo, skin_photo_rgb

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.34",
}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def model_section(tmp_path_factory) -> dict[str, Any]:
    """The shipped reference weights where they exist, else plumbing weights."""
    from dermpacs.config import Settings

    if all(p.is_file() for p in weights_paths(Settings())):
        return {}
    return services.write_plumbing_weights(tmp_path_factory.mktemp("plumbing-weights"))


def write_config(path: Path, **sections: Any) -> Path:
    return services.write_toml(path, sections)


def camera_photos(folder: Path, count: int, *, seed: int = 0) -> list[Path]:
    """``count`` camera-like photos (img2dcm JPEG), each in its own new study."""
    return [
        make_img2dcm_photo(folder / f"photo{i}", skin_photo_rgb(240, 320, seed=seed + i))
        for i in range(count)
    ]


def study_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def wait_for(probe, *, timeout: float, what: str, logs: list[services.ServiceProcess]):
    try:
        return services.wait_until(probe, timeout=timeout, interval=0.5, what=what)
    except TimeoutError:
        tails = "\n".join(f"--- {p.argv[3:5]} ---\n{p.log()[-4000:]}" for p in logs)
        pytest.fail(f"timed out waiting for {what}\n{tails}")


def assert_valid(dataset_path: Path | bytes) -> None:
    from io import BytesIO

    ds = dcmread(BytesIO(dataset_path) if isinstance(dataset_path, bytes) else dataset_path)
    assert dciodvfy_errors(ds) == [], f"dciodvfy errors in {ds.SOPClassUID}"


# ---------------------------------------------------------------------------------------------


def test_serve_with_embedded_defaults_writes_results_to_the_folder(tmp_path, model_section, dcmtk):
    port = services.free_port()
    root = tmp_path / "var"
    config = write_config(
        tmp_path / "dermpacs.toml",
        listener={"ae_title": "DERMPACS", "host": "127.0.0.1", "port": port},
        storage={"root": str(root)},
        model=model_section,
        destinations=[{"name": "outbox", "kind": "folder", "path": "outbox"}],
    )
    serve = services.dermpacs_process("serve", config, log_path=tmp_path / "serve.log")
    try:
        wait_for(
            lambda: services.c_echo(port, called_aet="DERMPACS"),
            timeout=60,
            what="the listener",
            logs=[serve],
        )
        (photo,) = camera_photos(tmp_path / "camera", 1)
        sent = services.storescu(port, [photo])
        assert sent.returncode == 0, sent.stderr
        study = study_of(photo)
        outbox = root / "outbox" / study

        def three_results():
            files = sorted(outbox.glob("*.dcm")) if outbox.is_dir() else []
            return files if len(files) == 3 else None

        files = wait_for(three_results, timeout=180, what="3 results in the outbox", logs=[serve])
        assert sorted(f.name.split("-")[0] for f in files) == ["overlay", "seg", "sr"]
        for path in files:
            ds = dcmread(path)
            assert ds.StudyInstanceUID == study
            assert_valid(path)
        (job,) = services.jobs_command(config, "list", "--limit", "1000")
        assert job["state"] == "delivered"
    finally:
        code = serve.stop(timeout=60)
    assert code == 0, serve.log()[-3000:]
    assert "Traceback" not in serve.log()


@pytest.fixture
def redis_service(tmp_path, model_section, orthanc, redis_url, postgres_url, dcmtk):
    """Listener and worker processes on Redis and PostgreSQL, sending to Orthanc."""
    port = services.free_port()
    run = uuid.uuid4().hex[:8]
    config = write_config(
        tmp_path / "dermpacs.toml",
        listener={"ae_title": "DERMPACS", "host": "127.0.0.1", "port": port},
        broker={"url": redis_url},
        storage={"root": str(tmp_path / "var")},
        database={"url": postgres_url},
        model=model_section,
        queues={
            "inference": {"name": f"inference-{run}", "concurrency": 1},
            "dispatch": {"name": f"dispatch-{run}", "concurrency": 1},
        },
        destinations=[
            {
                "name": "pacs",
                "kind": "dicom",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
    )
    listener = services.dermpacs_process("listen", config, log_path=tmp_path / "listen.log")
    worker = services.dermpacs_process("worker", config, log_path=tmp_path / "worker.log")
    processes = [listener, worker]
    try:
        wait_for(
            lambda: services.c_echo(port, called_aet="DERMPACS"),
            timeout=60,
            what="the listener",
            logs=processes,
        )
        wait_for(lambda: "ready." in worker.log(), timeout=90, what="the worker", logs=processes)
        yield {"port": port, "config": config, "orthanc": orthanc, "processes": processes}
    finally:
        for process in processes:
            process.stop(timeout=60)
        services.delete_redis_keys(f"*{run}*")


def results_in_study(orthanc: services.Orthanc, study: str) -> list[dict[str, Any]]:
    return orthanc.instances_in_study(study)


def wait_for_results(service, studies: list[str], timeout: float) -> dict[str, list]:
    orthanc = service["orthanc"]

    def all_there():
        found = {s: results_in_study(orthanc, s) for s in studies}
        return found if all(len(v) >= 3 for v in found.values()) else None

    return wait_for(
        all_there,
        timeout=timeout,
        what=f"results of {len(studies)} studies",
        logs=service["processes"],
    )


def test_a_photo_goes_through_redis_and_its_results_reach_orthanc_once(redis_service, tmp_path):
    orthanc = redis_service["orthanc"]
    (photo,) = camera_photos(tmp_path / "camera", 1, seed=10)
    study = study_of(photo)
    sent = services.storescu(redis_service["port"], [photo])
    assert sent.returncode == 0, sent.stderr
    found = wait_for_results(redis_service, [study], timeout=180)[study]
    classes = [orthanc.instance_tags(i["ID"])["SOPClassUID"] for i in found]
    kinds = sorted(
        "seg" if c == SEG_CLASS else "sr" if c in SR_CLASSES else "overlay" if c == SC_CLASS else c
        for c in classes
    )
    assert kinds == ["overlay", "seg", "sr"]
    series = {i["ParentSeries"] for i in found}
    assert len(series) == 3  # each object in its own new series, all in the photo's study
    for instance in found:
        assert_valid(orthanc.instance_file(instance["ID"]))

    # The same photo again: success for the camera, no second job, no second set of results.
    again = services.storescu(redis_service["port"], [photo])
    assert again.returncode == 0, again.stderr
    time.sleep(3)
    assert len(results_in_study(orthanc, study)) == 3
    jobs = services.jobs_command(redis_service["config"], "list", "--limit", "1000")
    assert [j["state"] for j in jobs] == ["delivered"]
    assert "already taken" in redis_service["processes"][0].log()


def test_ten_photos_sent_at_once_all_arrive(redis_service, tmp_path):
    photos = camera_photos(tmp_path / "camera", 10, seed=100)
    studies = [study_of(p) for p in photos]
    with ThreadPoolExecutor(max_workers=10) as pool:
        sends = list(pool.map(lambda p: services.storescu(redis_service["port"], [p]), photos))
    assert [s.returncode for s in sends] == [0] * 10, [s.stderr for s in sends if s.returncode]
    found = wait_for_results(redis_service, studies, timeout=400)
    assert sum(len(v) for v in found.values()) == 30
    jobs = services.jobs_command(redis_service["config"], "list", "--limit", "1000")
    assert len(jobs) == 10 and {j["state"] for j in jobs} == {"delivered"}
