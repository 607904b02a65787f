"""Background threads that hand committed jobs to the queue.

The listener answers a C-STORE once the job row is committed; publishing the task happens
after, in :class:`Publisher`, so that a slow or absent broker never holds a sender up. A job
whose publication fails stays ``received`` and :class:`PeriodicReconciler` publishes it
later, so nothing is lost while the broker is down.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from dermpacs.jobs.reconcile import Publish, reconcile_stalled, republish_after_broker_loss
from dermpacs.jobs.store import JobStore

logger = logging.getLogger(__name__)

_STOP = -1


class Publisher:
    """Publish processing tasks for job ids handed over by :meth:`submit`.

    Parameters
    ----------
    store
        Where published jobs are moved to ``queued``.
    publish
        Puts one processing task for a job id on the broker; may raise.
    batch
        Most job ids marked queued in one transaction.
    linger
        Seconds to wait after the first job id of a batch for more to arrive. A burst from a
        camera then costs one 'queued' commit per few photos instead of one per photo, and
        those commits stop competing with the listener's own for SQLite's write lock (the
        profile in docs/benchmarks.md); the task is published that much later.
    """

    def __init__(
        self, store: JobStore, publish: Publish, *, batch: int = 64, linger: float = 0.05
    ) -> None:
        self._store = store
        self._publish = publish
        self._batch = batch
        self._linger = linger
        self._pending: queue.Queue[int] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dermpacs-publisher", daemon=True)
        self._broker_down = False

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def submit(self, job_id: int) -> None:
        """Publish ``job_id`` soon (never blocks)."""
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
            published = []
            for job_id in ids:
                try:
                    self._publish(job_id)
                except Exception as exc:
                    # The rest of the batch stays received too: the reconciler publishes them
                    # once the broker answers, and a down broker is not waited on per job.
                    if not self._broker_down:
                        logger.warning(
                            "broker unavailable (%s); jobs stay received until it returns", exc
                        )
                    self._broker_down = True
                    break
                else:
                    if self._broker_down:
                        logger.info("broker reachable again")
                    self._broker_down = False
                    published.append(job_id)
            try:
                # Lazy: a mark lost in a power cut leaves the job received, and the reconciler
                # publishes it again (tasks are idempotent).
                self._store.mark_queued(published, synchronous_commit=False)
            except Exception:  # state stays received: republished later, tasks are idempotent
                logger.exception("could not mark %d job(s) queued", len(published))


class PeriodicReconciler:
    """Run :func:`~dermpacs.jobs.reconcile.reconcile_stalled` every ``interval`` seconds.

    With ``broker_epoch`` (a function naming the running broker instance, such as Redis's
    ``run_id``; None while it cannot be reached), a pass that finds the broker restarted since
    the last one publishes every queued job again
    (:func:`~dermpacs.jobs.reconcile.republish_after_broker_loss`).
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
    ) -> None:
        self._store = store
        self._broker_epoch = broker_epoch
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

    def start(self) -> PeriodicReconciler:
        self.observe_broker()
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._thread.join(timeout)

    def run_once(self) -> None:
        self.observe_broker()
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
