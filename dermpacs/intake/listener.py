"""The DICOM listener: C-ECHO and C-STORE SCP for photographs.

The C-STORE handler does three things and returns a status: admit (cheap header checks),
spool (the received bytes, fsync'd) and record (the job row, committed). Success is answered
only after all three; the job id is then handed to ``on_recorded`` (which publishes the
processing task in the background). Everything else happens in workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dermpacs.config import IntakeSettings, ListenerSettings
from dermpacs.imaging.sopclasses import ACCEPTED_TRANSFER_SYNTAXES, PHOTO_SOP_CLASSES
from dermpacs.intake.admission import AdmissionRefused, StoreStatus, admit
from dermpacs.intake.spool import Spool, SpoolError
from dermpacs.jobs.models import JobState
from dermpacs.jobs.store import JobStore, ReceivedInstance

logger = logging.getLogger(__name__)

# ErrorComment is LO: at most 64 characters (PS3.7 C.4.2.1.3, PS3.5 6.2).
_ERROR_COMMENT_LENGTH = 64


@dataclass
class ListenerCounters:
    """What the listener did since it started (read by tests and, later, metrics)."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0


def _status(status: StoreStatus, comment: str | None = None) -> Dataset:
    response = Dataset()
    response.Status = int(status)
    if comment:
        response.ErrorComment = comment[:_ERROR_COMMENT_LENGTH]
    return response


class Listener:
    """A pynetdicom AE that takes photographs into the spool and the job store.

    Parameters
    ----------
    settings
        The ``[listener]`` section.
    intake
        The ``[intake]`` section (size limit).
    spool
        Where received bytes go.
    store
        Where jobs are recorded.
    model_version
        The version of the models that will process the jobs: with the SOP Instance UID it
        makes the idempotency key.
    on_recorded
        Called with the id of each job that needs a processing task (new, or a failed job
        that was sent again). Must not block.
    sop_classes, transfer_syntaxes
        What is accepted; the photograph classes and syntaxes by default.
    """

    def __init__(
        self,
        settings: ListenerSettings,
        *,
        intake: IntakeSettings,
        spool: Spool,
        store: JobStore,
        model_version: str,
        on_recorded: Callable[[int], None],
        sop_classes: Sequence[str] = PHOTO_SOP_CLASSES,
        transfer_syntaxes: Sequence[str] = ACCEPTED_TRANSFER_SYNTAXES,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.spool = spool
        self.store = store
        self.model_version = model_version
        self.on_recorded = on_recorded
        self.sop_classes = tuple(str(s) for s in sop_classes)
        self.transfer_syntaxes = tuple(str(t) for t in transfer_syntaxes)
        self.counters = ListenerCounters()
        self.ae = self._build_ae()
        self._server: ThreadedAssociationServer | None = None

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.maximum_pdu_size = self.settings.max_pdu_size
        ae.acse_timeout = self.settings.acse_timeout
        ae.dimse_timeout = self.settings.dimse_timeout
        ae.network_timeout = self.settings.network_timeout
        # Checked at association (PS3.8 7.1.1.2): strangers are rejected before any data.
        ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for sop_class in self.sop_classes:
            # Compressed syntaxes first: the SCP accepts the first of its own syntaxes that
            # the requestor proposed, so the camera's JPEG bytes are kept as they are.
            ae.add_supported_context(sop_class, list(self.transfer_syntaxes))
        return ae

    @property
    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_REJECTED, self._log_rejected),
            (evt.EVT_ACCEPTED, self._log_accepted),
        ]

    # -- running --------------------------------------------------------------------------

    def start(self) -> ThreadedAssociationServer:
        """Listen in background threads; returns the server (``.shutdown()`` stops it)."""
        server = self.ae.start_server(
            (self.settings.host, self.settings.port),
            block=False,
            evt_handlers=self.handlers,
        )
        assert server is not None  # block=False returns the server
        self._server = server
        host, port = server.server_address[:2]
        logger.info(
            "listening as %s on %s:%d (%d SOP classes, %d transfer syntaxes, callers: %s)",
            self.settings.ae_title,
            host,
            port,
            len(self.sop_classes),
            len(self.transfer_syntaxes),
            ", ".join(self.settings.allowed_calling_aets) or "any",
        )
        return server

    @property
    def port(self) -> int:
        """The port listened on (useful with ``port = 0``)."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.server_address[1])

    def shutdown(self) -> None:
        """Stop accepting associations and close the open ones."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

    # -- handlers -------------------------------------------------------------------------

    def _refuse(
        self, status: StoreStatus, reason: str, sop_instance_uid: str, caller: str
    ) -> Dataset:
        self.counters.refused += 1
        logger.warning(
            "C-STORE from %s refused 0x%04X: %s (SOP Instance %s)",
            caller,
            status,
            reason,
            sop_instance_uid,
        )
        return _status(status, reason)

    def handle_store(self, event: Event) -> Dataset:
        """Admit, spool, record; answer success only when all three are done."""
        started = time.perf_counter()
        request = cast(C_STORE, event.request)
        caller = event.assoc.requestor.ae_title
        sop_class = str(request.AffectedSOPClassUID)
        sop_instance = str(request.AffectedSOPInstanceUID)
        syntax = str(event.context.transfer_syntax)
        try:
            encoded = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            return self._refuse(
                StoreStatus.CANNOT_UNDERSTAND,
                f"unreadable: {type(exc).__name__}",
                sop_instance,
                caller,
            )
        try:
            admitted = admit(
                encoded,
                affected_sop_class_uid=sop_class,
                affected_sop_instance_uid=sop_instance,
                transfer_syntax_uid=syntax,
                accepted_sop_classes=self.sop_classes,
                max_megapixels=self.intake.max_megapixels,
            )
        except AdmissionRefused as refusal:
            return self._refuse(refusal.status, refusal.reason, sop_instance, caller)

        # A photo already taken needs neither a second spool file nor a second job: its
        # bytes are durable and its job will produce (or produced) the results.
        try:
            known = self.store.find(admitted.sop_instance_uid, self.model_version)
        except Exception as exc:
            logger.exception("job store unavailable")
            return self._refuse(
                StoreStatus.OUT_OF_RESOURCES,
                f"job store unavailable: {type(exc).__name__}",
                sop_instance,
                caller,
            )
        if known is not None and known.state is not JobState.FAILED:
            self.counters.duplicates += 1
            logger.info(
                "C-STORE from %s: SOP Instance %s already taken (job %d, %s)",
                caller,
                sop_instance,
                known.id,
                known.state.value,
            )
            return _status(StoreStatus.SUCCESS)

        try:
            path = self.spool.spool_received_instance(encoded, admitted.sop_instance_uid)
        except SpoolError as exc:
            return self._refuse(StoreStatus.OUT_OF_RESOURCES, str(exc), sop_instance, caller)
        try:
            outcome = self.store.record_received(
                ReceivedInstance(
                    study_instance_uid=admitted.study_instance_uid,
                    series_instance_uid=admitted.series_instance_uid,
                    sop_instance_uid=admitted.sop_instance_uid,
                    sop_class_uid=admitted.sop_class_uid,
                    transfer_syntax_uid=admitted.transfer_syntax_uid,
                    calling_ae_title=caller,
                    spool_path=str(path),
                ),
                model_version=self.model_version,
            )
        except Exception as exc:
            logger.exception("job store unavailable")
            self.spool.discard(path)
            return self._refuse(
                StoreStatus.OUT_OF_RESOURCES,
                f"job store unavailable: {type(exc).__name__}",
                sop_instance,
                caller,
            )
        if not outcome.created and not outcome.needs_queueing:
            # Lost a race with a concurrent store of the same instance: keep the first file.
            self.spool.discard(path)
            self.counters.duplicates += 1
        else:
            self.counters.stored += 1
        if outcome.needs_queueing:
            self.on_recorded(outcome.job_id)
        logger.info(
            "C-STORE from %s: SOP Instance %s -> job %d (%s, %.1f ms)",
            caller,
            sop_instance,
            outcome.job_id,
            "new" if outcome.created else outcome.state.value,
            (time.perf_counter() - started) * 1000,
        )
        return _status(StoreStatus.SUCCESS)

    def _log_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        allowed = self.settings.allowed_calling_aets
        if allowed and requestor.ae_title not in allowed:
            why = "calling AE title not in listener.allowed_calling_aets"
        else:
            why = f"listener.max_associations ({self.settings.max_associations}) reached"
        logger.warning(
            "association from %s (%s) rejected: %s", requestor.ae_title, requestor.address, why
        )

    def _log_accepted(self, event: Event) -> None:
        requestor = event.assoc.requestor
        logger.debug("association from %s (%s) accepted", requestor.ae_title, requestor.address)
