"""Background threads (and a process) that hand committed jobs to the queue.

The listener answers a C-STORE once the job row is committed; publishing the task happens
after, in :class:`Publisher`, so that a slow or absent broker never holds a sender up. A job
whose publication fails stays ``received`` and :class:`PeriodicReconciler` publishes it
later, so nothing is lost while the broker is down.

:class:`PublisherProcess` runs a :class:`Publisher` in a child process: building and sending a
Celery message costs about as much Python as taking the photo did, and in the listener's own
process it competed with the receiving threads for the interpreter lock (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import queue
import struct
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from dermpacs.jobs.models import JobState, utc_now
from dermpacs.jobs.reconcile import Publish, reconcile_stalled, republish_after_broker_loss
from dermpacs.jobs.store import JobStore

if TYPE_CHECKING:
    from dermpacs.config import Settings

logger = logging.getLogger(__name__)

_STOP = -1


class Publisher:
    """Publish processing tasks for job ids handed over by :meth:`submit`.

    Parameters
    ----------
    store
        Where published jobs are moved to ``queued``.
    publish
        Puts one processing task for a job id on the broker; may raise. Called as
        ``publish(job_id, level=level)`` for a job submitted with its priority level (which
        spares a job store read per job), else ``publish(job_id)``. When it has a
        ``together()`` method (:class:`workers.app.ProcessingPublisher`), each batch is
        published inside it: a context manager whose publications reach the broker together
        when it ends, or none of them if it raises.
    batch
        Most job ids marked queued in one transaction.
    linger
        Seconds to wait after the first job id of a batch for more to arrive. A burst from a
        camera then costs one 'queued' commit per few photos instead of one per photo, and
        those commits stop competing with the listener's own for SQLite's write lock (the
        profile in docs/benchmarks.md); the task is published that much later.
    """

    def __init__(
        self,
        store: JobStore,
        publish: Callable[..., None],
        *,
        batch: int = 64,
        linger: float = 0.05,
    ) -> None:
        self._store = store
        self._publish = publish
        self._levels: dict[int, str] = {}
        self._batch = batch
        self._linger = linger
        self._pending: queue.Queue[int] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dermpacs-publisher", daemon=True)
        self._broker_down = False

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def submit(self, job_id: int, level: str | None = None) -> None:
        """Publish ``job_id`` soon, at priority ``level`` when given (never blocks)."""
        if level is not None:
            self._levels[job_id] = level
        self._pending.put(job_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Publish what was submitted, then stop."""
        self._pending.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            ids = [self._pending.get()]
            deadline = time.monotonic() + self._linger
            while len(ids) < self._batch and ids[-1] != _STOP:
                try:
                    ids.append(self._pending.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            if _STOP in ids:
                stopping = True
                ids = [i for i in ids if i != _STOP]
            published = self._publish_batch(ids)
            try:
                # Lazy: a mark lost in a power cut leaves the job received, and the reconciler
                # publishes it again (tasks are idempotent).
                self._store.mark_queued(published, synchronous_commit=False)
            except Exception:  # state stays received: republished later, tasks are idempotent
                logger.exception("could not mark %d job(s) queued", len(published))

    def _publish_batch(self, ids: list[int]) -> list[int]:
        """Publish ``ids`` in order; those that reached the broker."""
        published: list[int] = []
        levels = {job_id: self._levels.pop(job_id, None) for job_id in ids}
        together = getattr(self._publish, "together", None)
        try:
            with together() if together is not None and ids else contextlib.nullcontext():
                for job_id in ids:
                    level = levels[job_id]
                    if level is None:
                        self._publish(job_id)
                    else:
                        self._publish(job_id, level=level)
                    published.append(job_id)
        except Exception as exc:
            # The rest of the batch stays received too (all of it when the batch went
            # together): the reconciler publishes them once the broker answers, and a down
            # broker is not waited on per job.
            if together is not None:
                published.clear()
            if not self._broker_down:
                logger.warning("broker unavailable (%s); jobs stay received until it returns", exc)
            self._broker_down = True
            return published
        if published and self._broker_down:
            logger.info("broker reachable again")
            self._broker_down = False
        return published


_JOB_ID = struct.Struct("<q")


class PublisherProcess:
    """A :class:`Publisher` in a child process, fed job ids through a pipe.

    Same interface as :class:`Publisher` (``start``, ``submit``, ``stop``). The child opens
    its own job store and gets its publish function from ``make_publish(settings)``, a
    module-level function (the child is spawned, not forked from a threaded process). A
    child that dies is started again on the next ``submit``; ids it had not published stay
    ``received`` and the reconciler publishes them.

    Parameters
    ----------
    settings
        The configuration the child opens the job store and the broker with.
    make_publish
        Called once in the child: configures the broker and returns the function that puts
        one processing task on it (called with ``level=`` for a job submitted with its level).
    linger, batch
        As for :class:`Publisher`.
    """

    def __init__(
        self,
        settings: Settings,
        make_publish: Callable[[Settings], Callable[..., None]],
        *,
        linger: float = 0.05,
        batch: int = 64,
    ) -> None:
        self._settings = settings
        self._make_publish = make_publish
        self._linger = linger
        self._batch = batch
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._writer: Connection | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return None if self._process is None else self._process.pid

    def start(self) -> PublisherProcess:
        with self._lock:
            self._start_child()
        return self

    def _start_child(self) -> None:
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_publisher_child,
            args=(
                self._settings,
                self._make_publish,
                reader,
                self._linger,
                self._batch,
                logging.getLogger().getEffectiveLevel(),
            ),
            name="dermpacs-publisher",
            daemon=True,
        )
        process.start()
        reader.close()  # the child's end; ours is the writer
        self._process, self._writer = process, writer
        logger.debug("publisher process %d started", process.pid)

    def submit(self, job_id: int, level: str | None = None) -> None:
        """Publish ``job_id`` soon, at priority ``level`` when given (never blocks for long:
        the pipe holds thousands)."""
        message = _JOB_ID.pack(job_id) + (level or "").encode()
        with self._lock:
            if self._child_exited():
                # Found dead before writing: a pipe whose reading end some other process
                # inherited would take the id without complaint, and nobody would read it.
                assert self._process is not None
                logger.warning("publisher process %d exited; starting another", self._process.pid)
                self._close_child(timeout=0)
                self._start_child()
            for attempt in (1, 2):
                try:
                    assert self._writer is not None, "start() the publisher first"
                    self._writer.send_bytes(message)
                    return
                except OSError as exc:
                    if attempt == 2:
                        logger.error("publisher process unavailable (%s): job %d", exc, job_id)
                        return
                    logger.warning("publisher process gone (%s); starting another", exc)
                    self._close_child(timeout=0)
                    self._start_child()

    def _child_exited(self) -> bool:
        """Whether the child has ended, read from its sentinel (closed by the kernel when it
        exits), not from ``waitpid``: in a process where something else reaps children (a
        SIGCHLD handler), ``is_alive()`` would go on saying True."""
        if self._process is None:
            return False
        return bool(multiprocessing.connection.wait([self._process.sentinel], timeout=0))

    def stop(self, timeout: float = 10.0) -> None:
        """Publish what was submitted, then stop the child."""
        with self._lock:
            self._close_child(timeout=timeout)

    def _close_child(self, *, timeout: float) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError):  # a dead child has nothing left to do
                self._writer.send_bytes(_JOB_ID.pack(_STOP))
            self._writer.close()
            self._writer = None
        if self._process is not None:
            self._process.join(timeout)
            if not self._child_exited():
                logger.warning("publisher process %d did not stop; killed", self._process.pid)
                self._process.kill()
                self._process.join(5)
            self._process = None


def _publisher_child(
    settings: Settings,
    make_publish: Callable[[Settings], Callable[..., None]],
    reader: Connection,
    linger: float,
    batch: int,
    log_level: int,
) -> None:
    """The child of :class:`PublisherProcess`: ids from the pipe into a :class:`Publisher`."""
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s[publisher]: %(message)s"
    )
    store = JobStore.from_settings(settings, actor="listener")
    publisher = Publisher(store, make_publish(settings), linger=linger, batch=batch).start()
    try:
        while True:
            try:
                message = reader.recv_bytes()
            except EOFError:  # the listener is gone: publish what came, then stop
                break
            (job_id,) = _JOB_ID.unpack_from(message)
            if job_id == _STOP:
                break
            # the job's priority level follows its id, when the listener gave one
            publisher.submit(job_id, message[_JOB_ID.size :].decode() or None)
    finally:
        publisher.stop()
        store.dispose()


class PeriodicReconciler:
    """Run :func:`~dermpacs.jobs.reconcile.reconcile_stalled` every ``interval`` seconds.

    With ``broker_epoch`` (a function naming the running broker instance, such as Redis's
    ``run_id``; None while it cannot be reached), a pass that finds the broker restarted since
    the last one publishes every queued job again
    (:func:`~dermpacs.jobs.reconcile.republish_after_broker_loss`).

    With ``broker_holds`` (how many processing messages the broker holds, waiting or taken by
    a worker and not yet acknowledged; None when it cannot say), a pass that finds none while
    jobs have been ``queued`` for longer than ``received_grace`` publishes those again: their
    messages were lost without a restart (the database flushed, keys evicted under
    ``maxmemory``), which the epoch cannot see.
    """

    def __init__(
        self,
        store: JobStore,
        *,
        publish_processing: Publish,
        publish_dispatch: Publish,
        interval: float,
        received_grace: timedelta,
        processing_lease: timedelta,
        dispatch_grace: timedelta,
        dispatch_lease: timedelta | None = None,
        queued_grace: timedelta | None = None,
        broker_epoch: Callable[[], str | None] | None = None,
        broker_holds: Callable[[], int | None] | None = None,
    ) -> None:
        self._store = store
        self._broker_epoch = broker_epoch
        self._broker_holds = broker_holds
        self._epoch: str | None = None
        self._publish_processing = publish_processing
        self._publish_dispatch = publish_dispatch
        self._interval = interval
        self._received_grace = received_grace
        self._processing_lease = processing_lease
        self._dispatch_grace = dispatch_grace
        self._dispatch_lease = dispatch_lease
        self._queued_grace = queued_grace
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dermpacs-reconciler", daemon=True)

    def observe_broker(self) -> bool:
        """Read the broker's epoch; when it changed, publish the queued jobs again.

        Returns whether jobs were re-published.
        """
        if self._broker_epoch is None:
            return False
        try:
            epoch = self._broker_epoch()
        except Exception:  # down: nothing to compare; the next pass looks again
            return False
        if epoch is None:
            return False
        restarted = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        if restarted:
            republish_after_broker_loss(
                self._store,
                publish_processing=self._publish_processing,
                publish_dispatch=self._publish_dispatch,
            )
        return restarted

    def republish_stranded(self, now: datetime | None = None) -> list[int]:
        """Publish again the ``queued`` jobs that the broker holds no message for.

        Returns the ids published. Nothing is done while the broker holds any processing
        message (a backlog is not a fault) or cannot say.
        """
        if self._broker_holds is None:
            return []
        try:
            held = self._broker_holds()
        except Exception:
            return []
        if held != 0:
            return []
        now = now or utc_now()
        stranded = [
            j.id
            for j in self._store.list_jobs(
                states=[JobState.QUEUED], updated_before=now - self._received_grace, limit=None
            )
        ]
        if not stranded:
            return []
        published = []
        for job_id in stranded:
            try:
                self._publish_processing(job_id)
            except Exception as exc:  # down again: the next pass tries again
                logger.warning("could not publish stranded job %d: %s", job_id, exc)
                break
            published.append(job_id)
        self._store.touch(published)
        logger.warning(
            "%d queued job(s) waited over %.0f s while the broker held no processing message "
            "(emptied or evicted?): published again",
            len(published),
            self._received_grace.total_seconds(),
        )
        return published

    def start(self) -> PeriodicReconciler:
        self.observe_broker()
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._thread.join(timeout)

    def run_once(self) -> None:
        self.observe_broker()
        self.republish_stranded()
        reconcile_stalled(
            self._store,
            publish_processing=self._publish_processing,
            publish_dispatch=self._publish_dispatch,
            received_grace=self._received_grace,
            processing_lease=self._processing_lease,
            dispatch_grace=self._dispatch_grace,
            dispatch_lease=self._dispatch_lease,
            queued_grace=self._queued_grace,
        )

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self.run_once()
            except Exception:  # database briefly away: try again next pass
                logger.exception("reconciler pass failed")
