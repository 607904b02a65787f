"""The intake service: listener, spool, job store, publisher and reconciler, started together.

Start-up order matters: partial spool files of a crash are removed, every unfinished job is
published again, then the listener opens its port. How tasks reach the broker is handed in
(``publish_processing``, ``publish_dispatch``), so intake does not depend on Celery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from dermpacs.config import Settings
from dermpacs.intake.listener import Listener
from dermpacs.intake.receivers import ReceiverPool
from dermpacs.intake.recovery import recover_spooled
from dermpacs.intake.refusals import RefusalLog
from dermpacs.jobs.publisher import PeriodicReconciler, Publisher, PublisherProcess
from dermpacs.jobs.reconcile import RequeueSummary, requeue_unfinished
from dermpacs.jobs.store import JobStore

logger = logging.getLogger(__name__)


class IntakeService:
    """Everything ``dermpacs listen`` runs.

    Parameters
    ----------
    settings
        The configuration.
    model_version
        Keys jobs with the SOP Instance UID (:func:`dermpacs.processing.model_version`).
    publish_processing, publish_dispatch
        Put a task for a job id on the broker; may raise when it is down. A job the listener
        just recorded is published as ``publish_processing(job_id, level=level)`` with the
        priority level its rules chose; the other publications look the level up themselves.
    queued_grace
        Publish ``queued`` jobs again after this long (for a broker that does not redeliver);
        None trusts the broker.
    store
        A job store to use instead of the configured one.
    broker_epoch
        Names the running broker instance (None while unreachable); a change means it
        restarted and may have lost its messages, and queued jobs are published again.
    broker_holds
        How many processing messages the broker holds (None when it cannot say): queued jobs
        it holds none for are published again (:class:`PeriodicReconciler`).
    prepare_receiver
        A module-level function each receiving process (``listener.processes`` > 1) calls
        first: the log settings that keep patient data out of its log.
    publisher
        What publishes each received job (``dermpacs listen`` hands in a
        :class:`PublisherProcess`); by default a :class:`Publisher` thread calling
        ``publish_processing``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        model_version: str,
        publish_processing: Callable[..., None],
        publish_dispatch: Callable[[int], None],
        queued_grace: timedelta | None = None,
        store: JobStore | None = None,
        broker_epoch: Callable[[], str | None] | None = None,
        publisher: Publisher | PublisherProcess | None = None,
        broker_holds: Callable[[], int | None] | None = None,
        prepare_receiver: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.publish_processing = publish_processing
        self.publish_dispatch = publish_dispatch
        self.store = store or JobStore.from_settings(settings, actor="listener")
        self.model_version = model_version
        self.publisher = publisher or Publisher(self.store, publish_processing)
        self.refusals = RefusalLog(self.store.engine)
        self.listener = Listener.from_settings(
            settings,
            store=self.store,
            model_version=model_version,
            on_recorded=self.publisher.submit,
            on_refused=self.refusals.record,
        )
        self.spool = self.listener.spool
        self.priority_rules = self.listener.priority_rules
        self.receivers = (
            ReceiverPool(
                settings,
                model_version=model_version,
                count=settings.listener.processes - 1,
                on_recorded=self.publisher.submit,
                on_refused=self.refusals.record,
                prepare=prepare_receiver,
            )
            if settings.listener.processes > 1
            else None
        )
        jobs = settings.jobs
        lease = timedelta(seconds=jobs.lease_timeout)
        self.reconciler = PeriodicReconciler(
            self.store,
            publish_processing=publish_processing,
            publish_dispatch=publish_dispatch,
            interval=jobs.reconcile_interval,
            received_grace=timedelta(seconds=jobs.received_grace),
            processing_lease=lease,
            dispatch_grace=timedelta(seconds=jobs.dispatch_grace),
            dispatch_lease=lease,
            queued_grace=queued_grace,
            broker_epoch=broker_epoch,
            broker_holds=broker_holds,
        )

    def start(self) -> RequeueSummary:
        """Clean the spool, record spooled photos whose rows were lost, publish unfinished
        jobs, then listen. Returns what was published."""
        removed = self.spool.clear_incoming()
        if removed:
            logger.info("removed %d partial spool file(s) left by a crash", removed)
        recover_spooled(
            self.store,
            self.spool,
            model_version=self.model_version,
            priority_rules=self.priority_rules,
        )
        summary = requeue_unfinished(
            self.store,
            publish_processing=self.publish_processing,
            publish_dispatch=self.publish_dispatch,
        )
        self.publisher.start()
        self.refusals.start()
        if self.receivers is None:
            self.listener.start()
        else:
            self.receivers.start()
            self.listener.start(
                hand_off=self.receivers.hand_off, on_finished=self.receivers.local_finished
            )
        self.reconciler.start()
        return summary

    @property
    def port(self) -> int:
        return self.listener.port

    def stop(self) -> None:
        """Stop listening, then publish what was received and close the store."""
        self.listener.shutdown()
        if self.receivers is not None:  # what they recorded reaches the publisher first
            self.receivers.stop()
        self.reconciler.stop()
        self.publisher.stop()
        self.refusals.stop()
        self.store.dispose()
