"""The Celery configuration, the embedded broker, and the intake service's start-up rules."""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import timedelta

import pytest
from kombu import Connection

from dermpacs.config import ConfigError, Settings
from dermpacs.intake.service import IntakeService
from dermpacs.jobs import JobState, JobStore, ReceivedInstance, make_engine
from dermpacs.jobs.publisher import Publisher
from workers.app import (
    DISPATCH_TASK,
    PROCESS_TASK,
    celery_config,
    embedded_broker_url,
    redelivery_grace,
)
from workers.embedded import TRANSPORT


def settings_at(tmp_path, **tree) -> Settings:
    return Settings.model_validate({"storage": {"root": str(tmp_path)}, **tree})


def test_celery_is_json_only_late_acked_one_at_a_time(tmp_path):
    config = celery_config(settings_at(tmp_path))
    assert config["accept_content"] == ["json"]
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_routes"][PROCESS_TASK] == {"queue": "inference"}
    assert config["task_routes"][DISPATCH_TASK] == {"queue": "dispatch"}
    assert [(q.name, q.exchange.name, q.routing_key) for q in config["task_queues"]] == [
        ("inference", "inference", "inference"),
        ("dispatch", "dispatch", "dispatch"),
    ]
    assert config["task_annotations"][PROCESS_TASK]["time_limit"] == 600


def test_redis_gets_a_visibility_timeout_longer_than_any_task(tmp_path):
    settings = settings_at(tmp_path, broker={"url": "redis://127.0.0.1:6379/3"})
    config = celery_config(settings)
    assert config["broker_url"] == "redis://127.0.0.1:6379/3"
    assert config["broker_transport_options"] == {
        "visibility_timeout": 3600,
        "unacked_restore_interval": 60,
        "unacked_restore_throttle": 1,
        "priority_steps": [0, 5, 9],  # one per priority level
    }
    assert config["broker_use_ssl"] is None
    assert redelivery_grace(settings) is None
    too_short = settings_at(
        tmp_path,
        broker={"url": "redis://x", "visibility_timeout": 600},
        queues={"inference": {"name": "inference", "time_limit": 600}},
    )
    with pytest.raises(ConfigError, match=r"broker\.visibility_timeout"):
        celery_config(too_short)


def test_the_same_queue_name_twice_is_refused(tmp_path):
    settings = settings_at(tmp_path, queues={"dispatch": {"name": "inference"}})
    with pytest.raises(ConfigError, match=r"queues\.dispatch\.name"):
        celery_config(settings)


def test_the_embedded_broker_is_a_file_under_the_storage_root(tmp_path):
    settings = settings_at(tmp_path)
    config = celery_config(settings)
    assert config["broker_url"] == f"sqlite:///{(tmp_path / 'broker.sqlite3').resolve()}"
    assert config["broker_transport"] == TRANSPORT
    assert redelivery_grace(settings) == timedelta(seconds=60 + 600)


def test_the_embedded_broker_passes_messages_between_connections_and_forgets_taken_ones(
    tmp_path,
):
    url = embedded_broker_url(settings_at(tmp_path))
    with Connection(url, transport=TRANSPORT) as producer:
        queue = producer.SimpleQueue("inference")
        for job_id in range(5):
            queue.put({"job_id": job_id}, serializer="json")
        queue.close()
    received = []
    with Connection(url, transport=TRANSPORT) as consumer:
        queue = consumer.SimpleQueue("inference")
        for _ in range(5):
            message = queue.get(timeout=5)
            received.append(message.payload["job_id"])
            message.ack()
        queue.close()
    assert received == [0, 1, 2, 3, 4]
    import sqlite3

    rows = sqlite3.connect(url.removeprefix("sqlite:///")).execute(
        "select count(*) from kombu_message"
    )
    assert rows.fetchone() == (0,)


# --- publishing and start-up -------------------------------------------------------------


def record(store: JobStore, n: int) -> int:
    return store.record_received(
        ReceivedInstance(
            "1.2",
            "1.2.1",
            f"1.2.1.{n}",
            "1.2.840.10008.5.1.4.1.1.7",
            "1.2.840.10008.1.2.1",
            "CAM",
            f"/s/{n}",
        ),
        model_version="m",
    ).job_id


@pytest.fixture
def store(tmp_path):
    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}"))
    store.create_schema()
    yield store
    store.dispose()


def test_the_publisher_marks_published_jobs_queued_and_leaves_the_rest_received(store):
    ids = [record(store, n) for n in range(4)]
    broker_up = threading.Event()
    published: list[int] = []

    def publish(job_id: int) -> None:
        if not broker_up.is_set():
            raise ConnectionError("broker down")
        published.append(job_id)

    publisher = Publisher(store, publish).start()
    publisher.submit(ids[0])
    time.sleep(0.5)
    assert store.get(ids[0]).job.state is JobState.RECEIVED  # stays for the reconciler
    broker_up.set()
    for job_id in ids[1:]:
        publisher.submit(job_id)
    publisher.stop()
    assert published == ids[1:]
    assert [store.get(i).job.state for i in ids] == [JobState.RECEIVED] + [JobState.QUEUED] * 3


class PublishedTogether:
    """A publish function with together(): what reaches the 'broker' comes at each block's
    end, and nothing of a block whose end fails (as kombu's Redis pipeline)."""

    def __init__(self) -> None:
        self.broker_up = False
        self.sent: list[int] = []
        self.blocks = 0
        self._pending: list[int] | None = None

    def __call__(self, job_id: int) -> None:
        assert self._pending is not None, "published outside together()"
        self._pending.append(job_id)

    @contextlib.contextmanager
    def together(self):
        self._pending = []
        yield
        pending, self._pending = self._pending, None
        if not self.broker_up:
            raise ConnectionError("broker down")
        self.blocks += 1
        self.sent += pending


def test_a_batch_published_together_is_queued_whole_or_left_received_whole(store):
    publish = PublishedTogether()
    publisher = Publisher(store, publish, linger=0.2).start()
    lost = [record(store, n) for n in range(3)]
    for job_id in lost:
        publisher.submit(job_id)
    time.sleep(0.6)
    publish.broker_up = True
    sent = [record(store, n) for n in range(3, 7)]
    for job_id in sent:
        publisher.submit(job_id)
    publisher.stop()
    assert publish.sent == sent and publish.blocks == 1  # four ids, one round trip
    assert [store.get(i).job.state for i in lost] == [JobState.RECEIVED] * 3  # reconciler's
    assert [store.get(i).job.state for i in sent] == [JobState.QUEUED] * 4


def test_tasks_published_together_reach_redis_at_the_end_as_the_same_messages(tmp_path, redis_url):
    import json
    import uuid

    import redis

    from workers.app import configure, processing_publisher

    name = f"inference-together-{uuid.uuid4().hex[:8]}"
    settings = settings_at(
        tmp_path, broker={"url": redis_url}, queues={"inference": {"name": name}}
    )
    client = redis.Redis.from_url(redis_url)

    def on_redis() -> list[dict]:
        keys = sorted(client.scan_iter(match=f"{name}*"))
        return [json.loads(raw) for key in keys for raw in client.lrange(key, 0, -1)]

    publish = processing_publisher(settings)
    try:
        publish(1, level="normal")  # one by one, as everywhere else
        with publish.together():
            publish(2, level="normal")
            publish(3, level="normal")
            assert len(on_redis()) == 1  # still in the pipeline
        with pytest.raises(RuntimeError), publish.together():
            publish(4, level="normal")
            raise RuntimeError("the batch fails before its end")
        messages = on_redis()
        assert sorted(m["headers"]["argsrepr"] for m in messages) == ["[1]", "[2]", "[3]"]
        assert {m["headers"]["task"] for m in messages} == {PROCESS_TASK}
        assert len({m["properties"]["priority"] for m in messages}) == 1
        assert {m["content-type"] for m in messages} == {"application/json"}
    finally:
        for key in client.scan_iter(match=f"{name}*"):
            client.delete(key)
        configure(settings_at(tmp_path))


def test_intake_start_up_republishes_unfinished_jobs_before_listening(tmp_path, store):
    waiting = record(store, 1)
    settings = settings_at(tmp_path, listener={"port": 0, "host": "127.0.0.1"})
    stale = tmp_path / "spool" / ".incoming"
    stale.mkdir(parents=True)
    (stale / "crash.part").write_bytes(b"half")
    import os

    os.utime(stale / "crash.part", (1, 1))
    published: list[int] = []
    service = IntakeService(
        settings,
        model_version="m",
        publish_processing=published.append,
        publish_dispatch=published.append,
        store=store,
    )
    summary = service.start()
    try:
        assert summary.processing == [waiting] and published == [waiting]
        assert store.get(waiting).job.state is JobState.QUEUED
        assert not (stale / "crash.part").exists()
        assert service.port > 0
    finally:
        service.listener.shutdown()
        service.reconciler.stop()
        service.publisher.stop()


def test_tasks_retry_through_a_job_store_outage_and_are_thin(tmp_path):
    import inspect

    from sqlalchemy.exc import SQLAlchemyError

    from workers import tasks

    for task in (tasks.process_job, tasks.deliver_job):
        assert SQLAlchemyError in task.autoretry_for
        assert task.max_retries is None  # the job store counts attempts, not Celery
        body = inspect.getsource(task.run).split('"""')[-1].strip().splitlines()
        assert len(body) <= 3  # a wrapper: settings, (store,) the stage


def test_configure_again_publishes_to_the_new_broker(tmp_path):
    # Celery kept its producer pool across configure(), so a process configured a second time
    # (the full test run, a command after the admin page) published to the first broker.
    import sqlite3

    from dermpacs.config import load_settings
    from workers.app import configure, publish_processing

    def embedded(root):
        return load_settings(environ={"DERMPACS__STORAGE__ROOT": str(root)})

    configure(embedded(tmp_path / "first"))
    publish_processing(1)
    configure(embedded(tmp_path / "second"))
    publish_processing(2)

    for root, expected in ((tmp_path / "first", 1), (tmp_path / "second", 1)):
        with sqlite3.connect(root / "broker.sqlite3") as broker:
            assert broker.execute("select count(*) from kombu_message").fetchone()[0] == expected


def test_a_restarted_broker_gets_every_queued_job_again(store):
    from dermpacs.jobs.publisher import PeriodicReconciler

    queued = [record(store, n) for n in range(3)]
    store.mark_queued(queued)
    waiting = record(store, 9)  # received: not the broker's to lose
    epochs = iter(["run-a", "run-a", None, "run-b", "run-b"])
    processing: list[int] = []
    reconciler = PeriodicReconciler(
        store,
        publish_processing=processing.append,
        publish_dispatch=processing.append,
        interval=3600,
        received_grace=timedelta(hours=1),
        processing_lease=timedelta(hours=1),
        dispatch_grace=timedelta(hours=1),
        broker_epoch=lambda: next(epochs),
    )
    assert not reconciler.observe_broker()  # the first look: nothing to compare
    assert not reconciler.observe_broker()  # the same Redis
    assert not reconciler.observe_broker()  # down: no answer, nothing done
    assert reconciler.observe_broker()  # another run_id: it restarted
    assert sorted(processing) == queued and waiting not in processing
    assert not reconciler.observe_broker()  # once only
