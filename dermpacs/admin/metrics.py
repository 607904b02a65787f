"""Prometheus metrics derived from the job store when scraped.

No process has to count anything for ``/metrics``: the job store's audit trail already holds
every state change with its time, so :class:`JobStoreCollector` reads the events it has not
seen yet at each scrape and folds them into counters and histograms kept in memory. Counters
therefore count from the start of the job store (a restart of the admin page reads the trail
again and arrives at the same totals), and every host's listener and workers are counted,
whichever process serves ``/metrics``.

What each stage histogram measures (time spent in a state, observed when the job leaves it):

========== ============== ===========================================================
stage      state left     what the time is
========== ============== ===========================================================
publish    received       listener commit until the task is on the broker
queue      queued         waiting on the broker until a worker claims the job
processing processing     decode, segmentation, crops, classification, SEG/SR/overlay
delivery   results_ready  results written until every destination acknowledged them
========== ============== ===========================================================

Gauges (jobs per state, deliveries per destination, queue depths and ages, listener up) are
read fresh at each scrape.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from dermpacs.jobs.models import (
    RETRYABLE_STATES,
    TERMINAL_STATES,
    Delivery,
    Job,
    JobEvent,
    JobState,
    utc_now,
)
from dermpacs.jobs.store import JobStore

logger = logging.getLogger(__name__)

STAGE_OF_STATE = {
    JobState.RECEIVED: "publish",
    JobState.QUEUED: "queue",
    JobState.PROCESSING: "processing",
    JobState.RESULTS_READY: "delivery",
}
# Seconds. Receipt to delivery spans processing and a PACS round trip; stages are shorter.
END_TO_END_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# An audit event becomes "settled" this long after its time: ids below the newest settled one
# are not read again. Until then, events are re-read each scrape (and skipped when counted), so
# that one committed late by a slow transaction with a lower id is still counted.
SETTLE = timedelta(seconds=60)
_CHUNK = 5000


@dataclass
class CumulativeHistogram:
    """Bucket counts and sum of observations, in the form Prometheus exposes."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        running = 0
        out = []
        for bound, count in zip([*map(float, self.bounds), float("inf")], self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


@dataclass
class _JobProgress:
    state: JobState
    at: datetime


class AuditTrailTally:
    """Counters and histograms folded from the job store's audit trail, read incrementally.

    Parameters
    ----------
    store
        The job store.
    settle
        See :data:`SETTLE`.
    """

    def __init__(self, store: JobStore, *, settle: timedelta = SETTLE) -> None:
        self.store = store
        self.settle = settle
        self.received = 0
        self.processed = 0
        self.delivered = 0
        self.retried = 0
        self.cancelled = 0
        self.failed: dict[str, int] = {}
        self.end_to_end = CumulativeHistogram(END_TO_END_BUCKETS)
        self.stages = {
            stage: CumulativeHistogram(STAGE_BUCKETS) for stage in STAGE_OF_STATE.values()
        }
        self._watermark = 0  # every event id at or below it is counted
        self._counted_above: dict[int, datetime] = {}  # counted ids above it, with their time
        self._progress: dict[int, _JobProgress] = {}  # unfinished jobs: last state and time
        self._lock = threading.Lock()

    def update(self, *, now: datetime | None = None) -> int:
        """Read the events not counted yet; returns how many were counted now."""
        now = now or utc_now()
        with self._lock:
            counted = 0
            after = self._watermark
            while True:
                query = (
                    select(
                        JobEvent.id,
                        JobEvent.job_id,
                        JobEvent.at,
                        JobEvent.from_state,
                        JobEvent.to_state,
                        Job.created_at,
                    )
                    .join(Job, Job.id == JobEvent.job_id)
                    .where(JobEvent.id > after)
                    .order_by(JobEvent.id)
                    .limit(_CHUNK)
                )
                with self.store.engine.connect() as conn:
                    rows = conn.execute(query).all()
                for event_id, job_id, at, from_state, to_state, created_at in rows:
                    if event_id in self._counted_above:
                        continue
                    self._count(job_id, at, from_state, to_state, created_at)
                    self._counted_above[event_id] = at
                    counted += 1
                if len(rows) < _CHUNK:
                    break
                after = rows[-1][0]
            settled = [i for i, at in self._counted_above.items() if at <= now - self.settle]
            if settled:
                self._watermark = max(self._watermark, max(settled))
                self._counted_above = {
                    i: at for i, at in self._counted_above.items() if i > self._watermark
                }
            return counted

    def _count(
        self,
        job_id: int,
        at: datetime,
        from_state: JobState | None,
        to_state: JobState,
        created_at: datetime,
    ) -> None:
        to_state = JobState(to_state)
        from_state = None if from_state is None else JobState(from_state)
        if from_state is None:
            self.received += 1
        elif from_state in RETRYABLE_STATES:
            self.retried += 1
        if to_state is JobState.RESULTS_READY and from_state is JobState.PROCESSING:
            self.processed += 1
        elif to_state is JobState.DELIVERED:
            self.delivered += 1
            self.end_to_end.observe(max(0.0, (at - created_at).total_seconds()))
        elif to_state is JobState.FAILED:
            stage = "delivery" if from_state is JobState.RESULTS_READY else "processing"
            self.failed[stage] = self.failed.get(stage, 0) + 1
        elif to_state is JobState.CANCELLED:
            self.cancelled += 1
        previous = self._progress.get(job_id)
        # A cancel cuts a stage short: its time says nothing about how long the stage takes.
        if (
            previous is not None
            and from_state is previous.state
            and from_state in STAGE_OF_STATE
            and to_state is not JobState.CANCELLED
        ):
            seconds = max(0.0, (at - previous.at).total_seconds())
            self.stages[STAGE_OF_STATE[from_state]].observe(seconds)
        if to_state in TERMINAL_STATES:
            self._progress.pop(job_id, None)
        else:
            self._progress[job_id] = _JobProgress(to_state, at)


QueueProbe = Callable[[], Sequence[object]]
ListenerProbe = Callable[[], object]


class JobStoreCollector(Collector):
    """A Prometheus collector over the job store (and, optionally, queues and listener).

    Parameters
    ----------
    store
        The job store.
    refusal_counts
        Returns refused C-STOREs per status (:meth:`RefusalLog.counts_by_status`).
    queue_probe
        Returns :class:`~dermpacs.admin.queues.QueueStatus` records.
    listener_probe
        Returns an :class:`~dermpacs.admin.checks.EchoResult` for the listener.
    """

    def __init__(
        self,
        store: JobStore,
        *,
        refusal_counts: Callable[[], dict[int, int]] | None = None,
        queue_probe: QueueProbe | None = None,
        listener_probe: ListenerProbe | None = None,
    ) -> None:
        self.store = store
        self.tally = AuditTrailTally(store)
        self.refusal_counts = refusal_counts
        self.queue_probe = queue_probe
        self.listener_probe = listener_probe

    def describe(self) -> Iterator[Metric]:
        # Collected lazily: registering must not query the database.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        store_up = 1.0
        try:
            self.tally.update()
            by_state = self.store.counts_by_state()
            with self.store.engine.connect() as conn:
                deliveries = conn.execute(
                    select(Delivery.destination, Delivery.state, func.count()).group_by(
                        Delivery.destination, Delivery.state
                    )
                ).all()
        except Exception as exc:
            logger.warning("metrics: job store unavailable: %s", exc)
            store_up = 0.0
            by_state, deliveries = {}, []
        yield GaugeMetricFamily(
            "dermpacs_job_store_up", "Whether the job store answered this scrape.", store_up
        )
        if store_up:
            yield from self._tally_metrics()
            jobs = GaugeMetricFamily(
                "dermpacs_jobs", "Jobs in the job store, by state.", labels=["state"]
            )
            for state, count in sorted(by_state.items()):
                jobs.add_metric([state.value], count)
            yield jobs
            rows = GaugeMetricFamily(
                "dermpacs_deliveries",
                "Result objects per destination, by delivery state.",
                labels=["destination", "state"],
            )
            for destination, delivery_state, count in deliveries:
                rows.add_metric(
                    [destination, str(getattr(delivery_state, "value", delivery_state))], count
                )
            yield rows
        yield from self._refusal_metrics()
        yield from self._queue_metrics()
        yield from self._listener_metrics()
        yield GaugeMetricFamily(
            "dermpacs_metrics_scrape_seconds",
            "Time this collector took to gather the metrics.",
            time.perf_counter() - started,
        )

    def _tally_metrics(self) -> Iterator[Metric]:
        tally = self.tally
        yield CounterMetricFamily(
            "dermpacs_photos_received", "Photographs taken in (new jobs).", tally.received
        )
        yield CounterMetricFamily(
            "dermpacs_photos_processed",
            "Photographs whose SEG, SR and overlay were written.",
            tally.processed,
        )
        yield CounterMetricFamily(
            "dermpacs_photos_delivered",
            "Photographs whose results every destination acknowledged.",
            tally.delivered,
        )
        failed = CounterMetricFamily(
            "dermpacs_photos_failed",
            "Jobs given up, by the stage that gave up (processing or delivery).",
            labels=["stage"],
        )
        for stage in ("processing", "delivery"):
            failed.add_metric([stage], tally.failed.get(stage, 0))
        yield failed
        yield CounterMetricFamily(
            "dermpacs_jobs_retried",
            "Failed or cancelled jobs started again (admin retry or resend).",
            tally.retried,
        )
        yield CounterMetricFamily(
            "dermpacs_jobs_cancelled", "Jobs cancelled by an admin.", tally.cancelled
        )
        end_to_end = HistogramMetricFamily(
            "dermpacs_receive_to_delivered_seconds",
            "From the C-STORE of a photograph to the last acknowledgement of its results.",
        )
        end_to_end.add_metric([], tally.end_to_end.buckets(), tally.end_to_end.total)
        yield end_to_end
        stages = HistogramMetricFamily(
            "dermpacs_stage_seconds",
            "Time a job spent in one stage (publish, queue, processing, delivery).",
            labels=["stage"],
        )
        for stage, histogram in tally.stages.items():
            stages.add_metric([stage], histogram.buckets(), histogram.total)
        yield stages

    def _refusal_metrics(self) -> Iterator[Metric]:
        if self.refusal_counts is None:
            return
        from dermpacs.intake.refusals import REFUSAL_STATUS_NAMES, status_name

        try:
            counts = self.refusal_counts()
        except Exception as exc:
            logger.warning("metrics: refusals unavailable: %s", exc)
            return
        refused = CounterMetricFamily(
            "dermpacs_photos_refused",
            "C-STOREs the listener refused, by response status (PS3.4 B.2.3).",
            labels=["status", "reason"],
        )
        for status in sorted(set(REFUSAL_STATUS_NAMES) | set(counts)):
            refused.add_metric([f"0x{status:04X}", status_name(status)], counts.get(status, 0))
        yield refused

    def _queue_metrics(self) -> Iterator[Metric]:
        if self.queue_probe is None:
            return
        try:
            statuses = list(self.queue_probe())
        except Exception as exc:
            logger.warning("metrics: queues unavailable: %s", exc)
            return
        broker_up = GaugeMetricFamily(
            "dermpacs_broker_up", "Whether the broker answered this scrape.", 1.0
        )
        depth = GaugeMetricFamily(
            "dermpacs_queue_depth", "Messages on the broker no worker has taken.", labels=["queue"]
        )
        reserved = GaugeMetricFamily(
            "dermpacs_queue_reserved",
            "Messages workers hold unacknowledged (Redis only).",
            labels=["queue"],
        )
        waiting = GaugeMetricFamily(
            "dermpacs_queue_waiting_jobs",
            "Jobs waiting for the queue's stage, by the job store.",
            labels=["queue"],
        )
        oldest = GaugeMetricFamily(
            "dermpacs_queue_oldest_waiting_seconds",
            "How long the longest-waiting job of the queue has waited (0 when none waits).",
            labels=["queue"],
        )
        for status in statuses:
            name = str(getattr(status, "name", ""))
            if getattr(status, "broker_error", None):
                broker_up = GaugeMetricFamily(
                    "dermpacs_broker_up", "Whether the broker answered this scrape.", 0.0
                )
            value = getattr(status, "broker_depth", None)
            if value is not None:
                depth.add_metric([name], value)
            value = getattr(status, "reserved", None)
            if value is not None:
                reserved.add_metric([name], value)
            waiting.add_metric([name], getattr(status, "waiting_jobs", 0))
            oldest.add_metric([name], getattr(status, "oldest_waiting_seconds", None) or 0.0)
        yield from (broker_up, depth, reserved, waiting, oldest)

    def _listener_metrics(self) -> Iterator[Metric]:
        if self.listener_probe is None:
            return
        try:
            echo = self.listener_probe()
        except Exception as exc:
            logger.warning("metrics: listener probe failed: %s", exc)
            return
        up = bool(getattr(echo, "ok", False))
        yield GaugeMetricFamily(
            "dermpacs_listener_up", "Whether the DICOM listener answered a C-ECHO.", float(up)
        )
        if up:
            yield GaugeMetricFamily(
                "dermpacs_listener_echo_seconds",
                "Round trip of the listener's C-ECHO.",
                float(getattr(echo, "seconds", 0.0)),
            )
