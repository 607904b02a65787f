"""Queue tuning against a real Redis and real ``dermpacs listen`` / ``dermpacs worker``
processes: priorities chosen at intake, and the live changes of Celery's remote control
(pause, resume, rate limit, pool size) through ``dermpacs queues`` and the admin page."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dermpacs.cli import main
from dermpacs.jobs.models import JobState
from tests import services
from tests.test_admin_support import BOSS, READER, admin_section, basic

pytestmark = pytest.mark.integration

OUTBOX = [{"name": "outbox", "kind": "folder", "path": "outbox"}]


def make_stack(tmp_path: Path, redis: services.RedisServer, model: dict, **overrides: Any):
    return services.Stack(
        tmp_path,
        model=model,
        database_url="",
        broker=redis,
        destinations=OUTBOX,
        overrides={"admin": admin_section(), **overrides},
    )


def cli(capsys: pytest.CaptureFixture[str], stack: services.Stack, *argv: str) -> tuple[int, str]:
    code = main([argv[0], "--config", str(stack.config), *argv[1:]])
    return code, capsys.readouterr().out


def job_states(stack: services.Stack) -> dict[int, JobState]:
    store = stack.store()
    try:
        return {j.id: j.state for j in store.list_jobs(limit=None)}
    finally:
        store.dispose()


def send(stack: services.Stack, photos: list[Path], caller: str) -> None:
    statuses = services.send_photos(stack.port, photos, calling_aet=caller)
    assert set(statuses.values()) == {0}, statuses


def inspect_app(stack: services.Stack):
    from dermpacs.admin.queues import inspection_app
    from dermpacs.config import load_settings

    return inspection_app(load_settings(stack.config))


def test_an_urgent_job_is_processed_before_normal_ones_that_waited_longer(
    tmp_path, own_redis, plumbing_model, camera_template, capsys
):
    """Four normal photos, then an urgent one (its camera's AE title matches a rule), all
    queued while no worker runs; a worker of concurrency 1 then takes the urgent one first."""
    stack = make_stack(
        tmp_path,
        own_redis,
        plumbing_model,
        queues={
            **services.Stack(
                tmp_path, model=plumbing_model, database_url="", broker=None, destinations=OUTBOX
            ).tree["queues"],
            "rules": [{"level": "urgent", "calling_ae_title": "URGENT*"}],
        },
    )
    try:
        stack.start_listener()
        send(stack, services.clone_photos(camera_template, tmp_path / "n", 4), "CAMERA")
        send(stack, services.clone_photos(camera_template, tmp_path / "u", 1), "URGENTCAM")
        stack.wait(
            lambda: list(job_states(stack).values()) == [JobState.QUEUED] * 5 or None,
            timeout=20,
            what="five queued jobs",
        )
        store = stack.store()
        jobs = sorted(store.list_jobs(limit=None), key=lambda j: j.id)
        store.dispose()
        assert [j.priority for j in jobs] == ["normal"] * 4 + ["urgent"]
        # kombu's Redis transport keeps one list per priority step: 0 is the queue's own key
        redis = own_redis.client()
        assert redis.llen("inference") == 1
        assert redis.llen("inference\x06\x165") == 4

        stack.start_worker("--concurrency", "1")
        stack.wait(
            lambda: set(job_states(stack).values()) == {JobState.DELIVERED} or None,
            timeout=60,
            what="every job delivered",
        )
        store = stack.store()
        started = {
            job.id: next(
                e.at for e in store.get(job.id).events if e.to_state is JobState.PROCESSING
            )
            for job in jobs
        }
        store.dispose()
        order = sorted(started, key=started.__getitem__)
        assert order[0] == jobs[-1].id, (order, [j.priority for j in jobs])
        assert order[1:] == [j.id for j in jobs[:-1]]  # the normal ones in the order received

        code, out = cli(capsys, stack, "jobs", "show", str(jobs[-1].id))
        assert code == 0 and "priority urgent" in out
        code, out = cli(capsys, stack, "jobs", "list", "--json")
        assert sorted(j["priority"] for j in json.loads(out)) == ["normal"] * 4 + ["urgent"]
        from dermpacs.admin.app import create_app
        from dermpacs.config import load_settings

        with TestClient(create_app(load_settings(stack.config))) as client:
            page = client.get(f"/jobs/{jobs[-1].id}", headers=basic(READER)).text
            assert '<dd id="priority">urgent</dd>' in page
            assert (
                '<td class="priority">urgent</td>'
                in client.get("/jobs", headers=basic(READER)).text
            )
    finally:
        stack.stop()


def test_a_pause_holds_for_a_worker_that_starts_later_until_resumed(
    tmp_path, own_redis, plumbing_model, camera_template, capsys
):
    stack = make_stack(tmp_path, own_redis, plumbing_model)
    try:
        # No worker runs: nobody answers, but the pause is recorded (exit 1 says so).
        code, out = cli(capsys, stack, "queues", "pause", "inference", "--json")
        assert code == 1
        assert json.loads(out) == {
            "action": "pause",
            "target": "inference",
            "value": None,
            "recorded": True,
            "replies": {},
        }
        stack.start_listener()
        worker = stack.start_worker("--concurrency", "1")
        assert "queue inference is paused" in worker.log()
        send(stack, services.clone_photos(camera_template, tmp_path / "p", 1), "CAMERA")
        (job_id,) = job_states(stack)
        time.sleep(3)
        assert job_states(stack)[job_id] is JobState.QUEUED
        code, out = cli(capsys, stack, "queues", "--json")
        queues = {q["name"]: q for q in json.loads(out)}
        assert queues["inference"]["paused"] is True
        assert queues["inference"]["consumers"] == []
        assert queues["inference"]["broker_depth"] == 1
        assert len(queues["dispatch"]["consumers"]) == 1  # the other queue is still taken

        code, out = cli(capsys, stack, "queues", "resume", "inference", "--json")
        assert code == 0, out
        replies = json.loads(out)["replies"]
        assert [r["ok"] for r in replies.values()] == ["add consumer inference"]
        stack.wait(
            lambda: job_states(stack)[job_id] is JobState.DELIVERED or None,
            timeout=30,
            what="the job delivered after resume",
        )
        code, out = cli(capsys, stack, "queues")
        assert code == 0 and "PAUSED" not in out
    finally:
        stack.stop()


def test_live_pause_rate_limit_and_pool_size_through_cli_and_admin_page(
    tmp_path, own_redis, plumbing_model, capsys
):
    from dermpacs.admin.app import create_app
    from dermpacs.config import load_settings
    from dermpacs.jobs.store import JobStore

    stack = make_stack(tmp_path, own_redis, plumbing_model)
    try:
        stack.start_worker("--concurrency", "1")
        settings = load_settings(stack.config)
        store = JobStore.from_settings(settings)

        def consumed(app: Any) -> set[str]:
            answers = app.control.inspect(timeout=2).active_queues() or {}
            return {q["name"] for queues in answers.values() for q in queues}

        app = create_app(settings, store=store)
        with TestClient(app) as client, inspect_app(stack) as celery:
            assert consumed(celery) == {"inference", "dispatch"}
            # the admin page: an admin pauses; a reader sees the state and no form
            response = client.post(
                "/queues/inference/pause", headers=basic(BOSS), follow_redirects=False
            )
            assert response.status_code == 303
            assert response.headers["location"] == "/?queue_notice=paused#queues"
            assert consumed(celery) == {"dispatch"}
            assert client.post("/queues/inference/resume", headers=basic(READER)).status_code == (
                403
            )
            page = client.get("/", headers=basic(READER)).text
            assert '<span class="error">paused</span>' in page
            assert "/queues/inference/resume" not in page
            assert "/queues/inference/resume" in client.get("/", headers=basic(BOSS)).text

            code, out = cli(capsys, stack, "queues", "resume", "inference")
            assert code == 0 and "1 worker(s) acknowledged" in out
            assert consumed(celery) == {"inference", "dispatch"}

            code, out = cli(capsys, stack, "queues", "rate", "inference", "10/m", "--json")
            assert code == 0, out
            reply = json.loads(out)
            assert [r["ok"] for r in reply["replies"].values()] == [
                "new rate limit set successfully"
            ]
            code, out = cli(capsys, stack, "queues", "--json", "--no-workers")
            assert {q["name"]: q["rate_limit"] for q in json.loads(out)} == {
                "inference": "10/m",
                "dispatch": "",
            }
            response = client.post(
                "/queues/dispatch/rate",
                content=b"limit=fast",
                headers={**basic(BOSS), "Content-Type": "application/x-www-form-urlencoded"},
                follow_redirects=False,
            )
            assert response.headers["location"] == "/?queue_notice=bad-rate#queues"

            def pool_size() -> int:
                stats = celery.control.inspect(timeout=2).stats() or {}
                (only,) = stats.values()
                return len(only["pool"]["processes"])

            assert pool_size() == 1
            code, out = cli(capsys, stack, "queues", "pool", "grow", "2", "--json")
            assert code == 0, out
            assert stack.wait(lambda: pool_size() == 3 or None, timeout=10, what="3 processes")
            code, out = cli(capsys, stack, "queues", "pool", "shrink", "1")
            assert code == 0, out
            assert stack.wait(lambda: pool_size() == 2 or None, timeout=10, what="2 processes")
        store.dispose()
    finally:
        stack.stop()


def test_queue_control_refuses_on_the_embedded_broker(tmp_path, plumbing_model, capsys):
    stack = services.Stack(
        tmp_path,
        model=plumbing_model,
        database_url="",
        broker=None,
        destinations=OUTBOX,
        overrides={"admin": admin_section()},
    )
    code, out = cli(capsys, stack, "queues", "pause", "inference")
    assert code == 2
    assert "queue control needs Redis (broker.url)" in out
    code, out = cli(capsys, stack, "queues", "pool", "grow", "1", "--json")
    assert code == 2
    code, out = cli(capsys, stack, "queues", "--json", "--no-workers")
    assert [q["paused"] for q in json.loads(out)] == [False, False]  # nothing was recorded

    from dermpacs.admin.app import create_app
    from dermpacs.config import load_settings

    with TestClient(create_app(load_settings(stack.config))) as client:
        response = client.post(
            "/queues/inference/pause", headers=basic(BOSS), follow_redirects=False
        )
        assert response.headers["location"] == "/?queue_notice=unavailable#queues"
        assert client.post("/queues/nope/pause", headers=basic(BOSS)).status_code == 404
        # an action only from the page's own origin, as the retry button
        cross = {**basic(BOSS), "Origin": "http://evil.example"}
        assert client.post("/queues/inference/pause", headers=cross).status_code == 403
        assert client.post("/queues/inference/pause", headers=basic(READER)).status_code == 403


def test_an_unknown_queue_is_named(tmp_path, own_redis, plumbing_model, capsys):
    stack = make_stack(tmp_path, own_redis, plumbing_model)
    code, out = cli(capsys, stack, "queues", "pause", "inferense")
    assert code == 2
    assert "no queue 'inferense': the queues are inference, dispatch" in out
    code, out = cli(capsys, stack, "queues", "rate", "inference", "lots")
    assert code == 2 and "'lots' is not a rate limit" in out
