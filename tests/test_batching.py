"""Photos that arrive together are analysed together (``model.batch_size``).

The batcher on its own (threads handing in items at once), the analyser with the shipped
networks (a batch gives each photo the result it gets alone), and a real ``dermpacs worker``
with a threads pool taking a burst from Redis and delivering every photo.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from dermpacs.config import Settings
from dermpacs.inference.batching import Batcher
from dermpacs.inference.pipeline import Analyser
from dermpacs.jobs.models import JobState
from dermpacs.training.synth import generate_photo
from tests import services


def submit_together(batcher: Batcher, items: list) -> dict:
    """Each item from its own thread, released at the same moment; item -> result or error."""
    gate = threading.Barrier(len(items))
    outcome: dict = {}

    def one(item):
        gate.wait()
        try:
            outcome[item] = batcher.submit(item)
        except Exception as exc:
            outcome[item] = exc

    services.in_threads(one, items, timeout=30)
    return outcome


def test_items_handed_in_together_run_in_batches_no_larger_than_the_limit():
    sizes: list[int] = []

    def run(items):
        sizes.append(len(items))
        return [item * 10 for item in items]

    batcher = Batcher(run, max_size=4, max_wait=1.0)
    outcome = submit_together(batcher, list(range(6)))
    assert outcome == {i: i * 10 for i in range(6)}
    assert sum(sizes) == 6 and max(sizes) <= 4
    assert max(sizes) == 4  # six at once with a second to gather: one full batch at least
    assert batcher.largest_batch == 4 and batcher.batches_run == len(sizes)


def test_one_failing_item_does_not_fail_the_others():
    calls: list[list[str]] = []

    def run(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("cannot read bad")
        return [item.upper() for item in items]

    batcher = Batcher(run, max_size=8, max_wait=1.0)
    outcome = submit_together(batcher, ["a", "bad", "c"])
    assert outcome["a"] == "A" and outcome["c"] == "C"
    assert isinstance(outcome["bad"], ValueError) and str(outcome["bad"]) == "cannot read bad"
    assert sorted(calls[0]) == ["a", "bad", "c"]  # tried together first, then one by one
    assert sorted(map(tuple, calls[1:])) == [("a",), ("bad",), ("c",)]


def test_an_item_alone_waits_no_longer_than_max_wait():
    batcher = Batcher(lambda items: list(items), max_size=4, max_wait=0.05)
    assert batcher.submit("x") == "x"
    assert batcher.batches_run == 1 and batcher.largest_batch == 1


def test_a_batch_limit_below_one_is_refused():
    with pytest.raises(ValueError):
        Batcher(lambda items: items, max_size=0, max_wait=0.0)


def test_the_analyser_gives_a_batched_photo_the_result_it_gets_alone(tmp_path):
    settings = Settings.model_validate(
        {"storage": {"root": str(tmp_path)}, "model": {"batch_size": 3, "batch_wait_ms": 2000}}
    )
    batched = Analyser.from_settings(settings)
    alone = Analyser.from_settings(Settings.model_validate({"storage": {"root": str(tmp_path)}}))
    assert alone.batcher is None and batched.batcher is not None
    photos = [generate_photo(31, i, long_side=400).image for i in range(3)]
    # another orientation too: its own segmentation batch inside the one batch of photos
    photos[1] = np.ascontiguousarray(photos[1].transpose(1, 0, 2))

    results: dict[int, object] = {}

    def analyse(index: int) -> None:
        results[index] = batched.analyse(photos[index])

    services.in_threads(analyse, range(3), timeout=120)
    assert batched.batcher.batches_run == 1 and batched.batcher.largest_batch == 3
    for index, photo in enumerate(photos):
        expected = alone.analyse(photo)
        got = results[index]
        assert np.array_equal(got.label_map, expected.label_map)
        assert got.finding == expected.finding
        assert got.probabilities.keys() == expected.probabilities.keys()
        for name, value in expected.probabilities.items():
            assert got.probabilities[name] == pytest.approx(value, abs=1e-5)
        assert [c.box for c in got.crops] == [c.box for c in expected.crops]


@pytest.mark.integration
def test_a_threads_worker_analyses_a_queued_burst_together_and_delivers_each_photo(
    tmp_path: Path, plumbing_model: dict, camera_template: Path, own_redis: services.RedisServer
) -> None:
    stack = services.Stack(
        tmp_path,
        model={**plumbing_model, "batch_size": 4, "batch_wait_ms": 1000},
        database_url="",
        broker=own_redis,
        destinations=[{"name": "outbox", "kind": "folder", "path": "outbox"}],
    )
    photos = services.clone_photos(camera_template, tmp_path / "camera", 8)
    store = stack.store()
    try:
        stack.start_listener()
        assert services.send_photos(stack.port, photos, associations=2) == dict.fromkeys(photos, 0)
        stack.wait(
            lambda: len(store.list_jobs(states=[JobState.QUEUED])) == 8,
            timeout=30,
            what="8 jobs queued",
        )
        # started after the burst: it reserves four messages at once (prefetch 1 per thread)
        worker = stack.start_worker("--pool", "threads", "--concurrency", "4")
        stack.wait(
            lambda: store.counts_by_state().get("delivered") == 8,
            timeout=180,
            what="8 jobs delivered",
        )
        sizes = [
            int(line.split("dermpacs-batcher: ", 1)[1].split()[0])
            for line in worker.log().splitlines()
            if "analysed together" in line
        ]
        assert sum(sizes) == 8 and max(sizes) > 1, sizes
        outbox = stack.root / "outbox"
        delivered = [p for p in outbox.rglob("*.dcm")]
        assert len(delivered) == 3 * 8  # SEG, SR and overlay of each photo
    finally:
        stack.stop()
        store.dispose()
