"""Photos that arrive together are analysed together.

A GPU runs a batch of photos in little more time than one, and a worker process serves one
GPU. With ``model.batch_size`` above 1, the tasks that run at once in such a process (a threads
pool: ``dermpacs worker --pool threads --concurrency N``) each hand their photo to one
:class:`Batcher`; its thread takes the first photo waiting, lets others join for at most
``model.batch_wait_ms`` (or until the batch is full), runs them as one batch and gives each
task its own result. Everything else about a task stays its own: its job's claim and lease,
its retries, its result files. A photo gets the same result whatever arrives with it
(:meth:`Analyser.segment <dermpacs.inference.pipeline.Analyser.segment>`), and a photo that
fails does not fail the others: the batch is then run again one photo at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Run ``run_batch`` on items submitted from several threads, several at a time.

    Parameters
    ----------
    run_batch
        Returns one result per item, in order; called from the batcher's own thread only.
    max_size
        The most items in one call.
    max_wait
        Seconds the first item of a batch waits for others to join.
    name
        For the thread and the log.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], Sequence[Result]],
        *,
        max_size: int,
        max_wait: float,
        name: str = "batcher",
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._run_batch = run_batch
        self.max_size = max_size
        self.max_wait = max(0.0, max_wait)
        self.name = name
        self._waiting: queue.Queue[tuple[Item, Future[Result]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches_run = 0  # how many calls of run_batch, for tests and the log
        self.largest_batch = 0

    def submit(self, item: Item) -> Result:
        """Wait for ``item``'s result (its exception is raised here)."""
        self._ensure_thread()
        future: Future[Result] = Future()
        self._waiting.put((item, future))
        return future.result()

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def _collect(self) -> list[tuple[Item, Future[Result]]]:
        batch = [self._waiting.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_size:
            remaining = deadline - time.monotonic()
            try:
                # what is already waiting joins at once; then wait out the rest of max_wait
                batch.append(
                    self._waiting.get_nowait()
                    if remaining <= 0
                    else self._waiting.get(timeout=remaining)
                )
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            items = [item for item, _ in batch]
            started = time.perf_counter()
            try:
                results = list(self._run_batch(items))
                if len(results) != len(items):
                    raise RuntimeError(
                        f"{self.name}: {len(results)} results for {len(items)} items"
                    )
            except BaseException as exc:
                if len(batch) == 1:
                    batch[0][1].set_exception(exc)
                    continue
                # one bad item must not fail the others: each on its own
                logger.warning(
                    "%s: a batch of %d failed (%s: %s); running them one at a time",
                    self.name,
                    len(batch),
                    type(exc).__name__,
                    exc,
                )
                for item, future in batch:
                    try:
                        future.set_result(self._run_batch([item])[0])
                    except BaseException as single:
                        future.set_exception(single)
                continue
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            logger.info(
                "%s: %d photo(s) analysed together in %.0f ms",
                self.name,
                len(batch),
                (time.perf_counter() - started) * 1000.0,
            )
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
