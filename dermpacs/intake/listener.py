"""The DICOM listener: C-ECHO and C-STORE SCP for photographs.

The C-STORE handler does three things and returns a status: admit (cheap header checks),
spool (the received bytes, fsync'd) and record (the job row, committed). Success is answered
only after all three; the job id is then handed to ``on_recorded`` (which publishes the
processing task in the background). Everything else happens in workers. A data set refused
for what it is (not for a full disk) is kept in the quarantine with the reason.

Who may talk to it is checked before any data is read: the IP allow-list when the connection
is accepted (the socket is closed at once), the calling and called AE titles at association
(PS3.8 7.1.1). A second port can speak DICOM over TLS (PS3.15 B.1) beside the plain one; its
handshake runs in the association's own thread with the ACSE timeout, so that a peer that
connects and says nothing cannot hold the acceptor.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.fsm import StateMachine
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dermpacs.config import IntakeSettings, ListenerSettings, Settings
from dermpacs.imaging.sopclasses import ACCEPTED_TRANSFER_SYNTAXES, PHOTO_SOP_CLASSES
from dermpacs.intake.admission import AdmissionRefused, StoreStatus, admit
from dermpacs.intake.arrival import (
    ArrivingDataSet,
    OpenIncoming,
    SpoolingDIMSEProvider,
    file_header,
    spool_on_arrival,
)
from dermpacs.intake.priority import PriorityRules
from dermpacs.intake.quarantine import Quarantine, QuarantineRecord
from dermpacs.intake.spool import IncomingFile, Spool, SpoolError, SpoolFullError
from dermpacs.jobs.models import LEGACY_PRIORITY, JobState
from dermpacs.jobs.store import JobStore, ReceivedInstance

logger = logging.getLogger(__name__)

# ErrorComment is LO: at most 64 characters (PS3.7 C.4.2.1.3, PS3.5 6.2).
_ERROR_COMMENT_LENGTH = 64
# A-ASSOCIATE-RJ diagnostics (PS3.8 9.3.4): why an association was rejected.
_REJECT_REASONS = {
    0x03: "calling AE title not in listener.allowed_calling_aets",
    0x07: "called AE title is not listener.ae_title",
}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Sequence[str]) -> tuple[Network, ...]:
    """``listener.allowed_hosts`` as networks (an address is a network of one)."""
    return tuple(ipaddress.ip_network(e, strict=False) for e in entries)


def host_allowed(address: str, networks: Sequence[Network]) -> bool:
    """Whether ``address`` lies in one of ``networks`` (any address when there are none)."""
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 peer on a dual-stack socket
    return any(ip in net for net in networks)


def server_tls_context(settings: ListenerSettings) -> ssl.SSLContext:
    """The TLS context of the listener's TLS port: TLS 1.2 or later, our certificate, and
    client certificates required when ``tls_ca_certificates`` is set (PS3.15 B.1).

    Raises
    ------
    OSError, ssl.SSLError
        A certificate or key file cannot be read.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    if settings.tls_ca_certificates:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=settings.tls_ca_certificates)
    return context


class BulkReadSocket(AssociationSocket):
    """pynetdicom's association socket, reading each PDU into one buffer.

    pynetdicom's :meth:`AssociationSocket.recv` reads 4 KB per ``recv`` call and appends each
    piece to a ``bytearray``: a 12-MP camera photo (2.9 MB in 128 KB PDUs) took about 700
    calls and as many copies, a third of the listener's time per photo here
    (docs/benchmarks.md). This reads straight into a buffer of the PDU's size. Same contract:
    the bytes asked for, or fewer when the peer closed the connection.
    """

    # How long :attr:`ready` waits in ``select`` for bytes to arrive or a primitive to be
    # queued for sending (:meth:`wake`); either ends the wait at once. pynetdicom's reactor
    # asks with no wait and sleeps 1 ms whenever nothing had arrived: with four associations
    # that was 4000 wake-ups a second contending for the interpreter lock with the threads
    # receiving photos (the reactor's own sleep is set to 0).
    wait_for_data = 0.05
    # Without a wake pipe (a socket not made by this listener's handler), or once closed.
    short_wait = 0.001
    _wake_fds: tuple[int, int] | None = None

    def open_wake_pipe(self) -> None:
        """The pipe that :meth:`wake` writes to and :attr:`ready` watches."""
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        self._wake_fds = (read_end, write_end)

    def wake(self) -> None:
        """End a wait in :attr:`ready` now: a primitive is queued for sending."""
        if self._wake_fds is not None:
            with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                os.write(self._wake_fds[1], b"\0")

    def close_wake_pipe(self) -> None:
        fds, self._wake_fds = self._wake_fds, None
        for fd in fds or ():
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def ready(self) -> bool:
        if self.socket is None or self._is_connected is False:
            time.sleep(self.short_wait)  # closed: keep the reactor's pace, do not spin
            return False
        if isinstance(self.socket, ssl.SSLSocket) and self.socket.pending():
            return True  # TLS bytes already decrypted, which select cannot see
        wake = self._wake_fds[0] if self._wake_fds is not None else None
        watched: list[Any] = [self.socket] if wake is None else [self.socket, wake]
        try:
            ready, _, _ = select.select(
                watched, [], [], self.short_wait if wake is None else self.wait_for_data
            )
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if wake is not None and wake in ready:
            with contextlib.suppress(OSError):
                os.read(wake, 4096)
        return self.socket in ready

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        try:
            while received < nr_bytes:
                count = sock.recv_into(view[received:], nr_bytes - received)
                if not count:  # closed by the peer: what arrived, as pynetdicom returns it
                    break
                received += count
        finally:
            view.release()
        if received < nr_bytes:
            del buffer[received:]
        return buffer


class SignallingQueue(queue.Queue):
    """A queue that sets :attr:`signal` whenever something is put on it."""

    signal: threading.Event

    def _put(self, item: Any) -> None:
        super()._put(item)
        self.signal.set()


class ReactorQueue(SignallingQueue):
    """The DIMSE message queue of an acceptor association, which its reactor waits on.

    pynetdicom's association reactor asks this queue for a message without blocking, and
    sleeps 1 ms before asking again: a complete photo waited half a millisecond on average to
    be served, and every association woke its thread a thousand times a second to contend for
    the interpreter lock with the threads receiving photos. Here a request that finds the
    queue empty waits for :attr:`signal` instead, set when a message arrives here, when the
    DUL hands the association a primitive (a release or abort request; the same signal) and
    when the DUL ends; at most ``idle_wait`` seconds, so that the reactor's other checks (a
    kill, the network timeout) keep running.
    """

    idle_wait = 0.05

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block and not self.qsize():
            self.signal.wait(self.idle_wait)
            self.signal.clear()
        return super().get(block, timeout)


def wait_for_messages(assoc: Association) -> None:
    """Make an acceptor association's reactor wait for messages (:class:`ReactorQueue`)."""
    signal = threading.Event()
    assoc.dimse.msg_queue.__class__ = ReactorQueue
    assoc.dul.to_user_queue.__class__ = SignallingQueue
    for signalling in (assoc.dimse.msg_queue, assoc.dul.to_user_queue):
        cast(SignallingQueue, signalling).signal = signal


class WakingDUL(DULServiceProvider):
    """pynetdicom's DUL that wakes its socket's wait when a primitive is queued to send, and
    its association's reactor when it ends."""

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        if isinstance(self.socket, BulkReadSocket):
            self.socket.wake()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            signal = getattr(self.to_user_queue, "signal", None)
            if signal is not None:
                signal.set()


class AcceptorStateMachine(StateMachine):
    """pynetdicom's DUL state machine, which tells the acceptor at once when the connection
    ends before an association was requested.

    A connection that closes without sending an A-ASSOCIATE-RQ (Sta2 + Evt17, AA-5) or whose
    ARTIM timer expires (Sta2 + Evt18, AA-2) returns the DUL to Sta1, but pynetdicom's acceptor
    keeps waiting ``acse_timeout`` (30 s) for the request that cannot come. Meanwhile the
    connection counts against ``max_associations`` and, with ``listener.processes``, against
    the process that took it: a load balancer's or monitor's TCP port check every second
    turned real cameras away as over the limit. Putting ``None`` on the queue the acceptor
    waits on is what pynetdicom does for a requestor's failed connection (pull request #618):
    the acceptor ends as if its wait had timed out.
    """

    def transition(self, state: str) -> None:
        never_requested = self.current_state == "Sta2" and state == "Sta1"
        super().transition(state)
        if never_requested:
            self.dul.to_user_queue.put(None)


class BulkReadRequestHandler(RequestHandler):
    """pynetdicom's request handler with :class:`BulkReadSocket` for each association, whose
    C-STORE data sets are spooled as they arrive (:mod:`dermpacs.intake.arrival`)."""

    assoc: Any = None

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # The socket pynetdicom made wraps this request's connection; it only gains the
        # bulk ``recv`` (no state of its own), so re-classing it keeps everything else as is.
        assoc.dul.socket.__class__ = BulkReadSocket
        cast(BulkReadSocket, assoc.dul.socket).open_wake_pipe()
        # ... and the DUL wakes it when there is something to send (WakingDUL).
        assoc.dul.__class__ = WakingDUL
        assoc.dul._run_loop_delay = 0  # BulkReadSocket.ready waits for data instead
        assoc.dul.state_machine.__class__ = AcceptorStateMachine
        wait_for_messages(assoc)
        spool_on_arrival(assoc, getattr(self.server, "open_incoming", None))
        self.assoc = assoc
        return assoc

    def handle(self) -> None:
        super().handle()  # starts the association's own thread
        # This request's thread lasts as long as the association: the server's on_finished
        # is called once it has ended, and spool files of photos it never answered go.
        self.assoc.join()
        # Its reader thread writes the fragments and watches the wake pipe: once it has
        # ended too, the files of photos never answered (aborted mid-photo) and the pipe go.
        # If it does not end, nothing is touched (start-up clears the incoming folder).
        dul = self.assoc.dul
        dul.join(5.0)
        if dul.is_alive():
            logger.warning("association's reader still running: its incoming spool file is left")
            return
        if isinstance(self.assoc.dimse, SpoolingDIMSEProvider):
            self.assoc.dimse.discard_unfinished()
        cast(BulkReadSocket, dul.socket).close_wake_pipe()


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the IP allow-list and a non-blocking TLS accept.

    pynetdicom wraps a TLS socket in the acceptor thread, where a silent peer would block
    every later connection; here the acceptor only accepts, and the handshake happens in
    the connection's thread, bounded by ``handshake_timeout``.
    """

    allowed_networks: tuple[Network, ...] = ()
    handshake_timeout: float = 30.0
    kind = "plain"  # or "tls": which of the listener's ports this is
    # Offered each accepted connection first (listener.processes > 1): True when another
    # process took it (intake.receivers.ReceiverPool.hand_off).
    hand_off: Callable[[socket.socket, Any, str], bool] | None = None
    # Called when an association served here has ended.
    on_finished: Callable[[], None] | None = None
    # Opens the spool file of each arriving C-STORE data set (Listener._open_incoming).
    open_incoming: OpenIncoming | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", BulkReadRequestHandler)
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        return client_socket, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        if host_allowed(host, self.allowed_networks):
            return True
        logger.warning("connection from %s refused: not in listener.allowed_hosts", host)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.hand_off is not None and self.hand_off(request, client_address, self.kind):
            self.close_request(request)  # our copy: the receiving process holds its own
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self.ssl_context is not None:
                try:
                    request.settimeout(self.handshake_timeout)
                    request = self.ssl_context.wrap_socket(request, server_side=True)
                    request.settimeout(None)
                except (OSError, ValueError) as exc:
                    logger.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            if self.on_finished is not None:
                self.on_finished()


class AdoptingAssociationServer(GuardedAssociationServer):
    """Serves connections that another process accepted and handed over
    (:mod:`dermpacs.intake.receivers`); it listens on nothing itself."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def shutdown(self) -> None:
        # never served forever, so there is no loop to stop: only the unused socket to close
        self.server_close()


class RefusalHook(Protocol):
    """What :class:`Listener` calls for each refused C-STORE."""

    def __call__(
        self, status: int, reason: str, *, calling_ae_title: str, sop_instance_uid: str
    ) -> None: ...


@dataclass
class ListenerCounters:
    """What the listener did since it started (read by tests and, later, metrics)."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    quarantined: int = 0


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
        Called with the id and priority level of each job that needs a processing task (new,
        or a failed job that was sent again). Must not block.
    sop_classes, transfer_syntaxes
        What is accepted; the photograph classes and syntaxes by default.
    quarantine
        Where refused data sets are kept with the reason; None keeps none.
    on_refused
        Called for every refused C-STORE with its status, the reason and (keywords)
        ``calling_ae_title`` and ``sop_instance_uid`` (:meth:`RefusalLog.record
        <dermpacs.intake.refusals.RefusalLog.record>`). Must not block.
    priority_rules
        Choose each job's priority level (``[[queues.rules]]``); None: every job ``normal``.
    """

    def __init__(
        self,
        settings: ListenerSettings,
        *,
        intake: IntakeSettings,
        spool: Spool,
        store: JobStore,
        model_version: str,
        on_recorded: Callable[[int, str], None],
        sop_classes: Sequence[str] = PHOTO_SOP_CLASSES,
        transfer_syntaxes: Sequence[str] = ACCEPTED_TRANSFER_SYNTAXES,
        quarantine: Quarantine | None = None,
        on_refused: RefusalHook | None = None,
        priority_rules: PriorityRules | None = None,
    ) -> None:
        self.settings = settings
        self.priority_rules = priority_rules or PriorityRules(
            rules=(), default_level=LEGACY_PRIORITY
        )
        self.intake = intake
        self.spool = spool
        self.store = store
        self.model_version = model_version
        self.on_recorded = on_recorded
        self.sop_classes = tuple(str(s) for s in sop_classes)
        self.transfer_syntaxes = tuple(str(t) for t in transfer_syntaxes)
        self.quarantine = quarantine
        self.on_refused = on_refused
        self.counters = ListenerCounters()
        self.networks = parse_networks(settings.allowed_hosts)
        self.ae = self._build_ae()
        self._servers: dict[str, GuardedAssociationServer] = {}
        self._below_watermark = False

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        store: JobStore,
        model_version: str,
        on_recorded: Callable[[int, str], None],
        on_refused: RefusalHook | None = None,
    ) -> Listener:
        """The listener as the intake service and every receiving process run it: spool,
        quarantine and priority rules from ``settings``."""
        root = Path(settings.storage.root)
        return cls(
            settings.listener,
            intake=settings.intake,
            spool=Spool(root, min_free_bytes=settings.storage.min_free_mb * 2**20),
            store=store,
            model_version=model_version,
            on_recorded=on_recorded,
            quarantine=Quarantine(root, max_bytes=settings.intake.quarantine_max_mb * 2**20),
            on_refused=on_refused,
            priority_rules=PriorityRules.from_settings(settings.queues),
        )

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        # Shared by the receiving processes (listener.processes): each serves its share.
        ae.maximum_associations = -(-self.settings.max_associations // self.settings.processes)
        ae.maximum_pdu_size = self.settings.max_pdu_size
        ae.acse_timeout = self.settings.acse_timeout
        ae.dimse_timeout = self.settings.dimse_timeout
        ae.network_timeout = self.settings.network_timeout
        # Checked at association (PS3.8 7.1.1.2): strangers are rejected before any data.
        ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        ae.require_called_aet = self.settings.require_called_aet
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

    def _ports(self) -> list[tuple[str, int, ssl.SSLContext | None]]:
        """The configured ports: kind ("plain", "tls"), number and TLS context."""
        ports: list[tuple[str, int, ssl.SSLContext | None]] = []
        if not self.settings.tls_only:
            ports.append(("plain", self.settings.port, None))
        if self.settings.tls_port:
            ports.append(("tls", self.settings.tls_port, server_tls_context(self.settings)))
        return ports

    def _serve(self, port: int, tls: ssl.SSLContext | None) -> GuardedAssociationServer:
        server = self.ae.make_server(
            (self.settings.host, port),
            ssl_context=tls,
            evt_handlers=self.handlers,
            server_class=GuardedAssociationServer,
        )
        assert isinstance(server, GuardedAssociationServer)
        server.allowed_networks = self.networks
        server.handshake_timeout = self.settings.acse_timeout
        server.open_incoming = self._open_incoming
        # As AE.start_server(block=False) does, so that AE.shutdown() stops it too.
        thread = threading.Thread(
            target=server.serve_forever, name=f"dermpacs-acceptor-{port}", daemon=True
        )
        thread.start()
        self.ae._servers.append(server)
        return server

    def start(
        self,
        *,
        hand_off: Callable[[socket.socket, Any, str], bool] | None = None,
        on_finished: Callable[[], None] | None = None,
    ) -> GuardedAssociationServer:
        """Listen in background threads: the plain port, and the TLS port when configured.

        Returns the first server started (``.shutdown()`` stops it). ``hand_off`` is offered
        each accepted connection first, and ``on_finished`` called when an association served
        here ends (:class:`~dermpacs.intake.receivers.ReceiverPool`).

        Raises
        ------
        OSError
            A port is taken, or a TLS certificate or key cannot be read.
        """
        for kind, port, tls in self._ports():
            self._servers[kind] = self._serve(port, tls)
        for kind, server in self._servers.items():
            server.kind, server.hand_off, server.on_finished = kind, hand_off, on_finished
            host, port = server.server_address[:2]
            logger.info(
                "listening as %s on %s:%d%s (%d SOP classes, %d transfer syntaxes, "
                "callers: %s, hosts: %s)",
                self.settings.ae_title,
                host,
                port,
                " (TLS)" if kind == "tls" else "",
                len(self.sop_classes),
                len(self.transfer_syntaxes),
                ", ".join(self.settings.allowed_calling_aets) or "any",
                ", ".join(self.settings.allowed_hosts) or "any",
            )
        return next(iter(self._servers.values()))

    def adopt(self, *, on_finished: Callable[[], None] | None = None) -> None:
        """Serve connections another process accepted (:meth:`take`) instead of listening."""
        for kind, _port, tls in self._ports():
            server = self.ae.make_server(
                (self.settings.host, 0),
                ssl_context=tls,
                evt_handlers=self.handlers,
                server_class=AdoptingAssociationServer,
            )
            assert isinstance(server, AdoptingAssociationServer)
            server.handshake_timeout = self.settings.acse_timeout
            server.open_incoming = self._open_incoming
            server.kind, server.on_finished = kind, on_finished
            self._servers[kind] = server

    def take(self, request: socket.socket, client_address: Any, kind: str) -> None:
        """Serve a connection accepted elsewhere (``kind``: the port it came to) in a thread."""
        server = self._servers.get(kind)
        if not isinstance(server, AdoptingAssociationServer):
            logger.error("a %s connection was handed over, but that port is not served", kind)
            request.close()
            return
        with contextlib.suppress(OSError):  # what pynetdicom reports as the acceptor's address
            server.server_address = request.getsockname()[:2]
        server.process_request(request, client_address)

    @property
    def port(self) -> int:
        """The plain port listened on (useful with ``port = 0``); the TLS port if only TLS."""
        server = self._servers.get("plain") or self._servers.get("tls")
        if server is None:
            raise RuntimeError("the listener is not started")
        return int(server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The TLS port listened on, or None."""
        server = self._servers.get("tls")
        return None if server is None else int(server.server_address[1])

    def shutdown(self) -> None:
        """Stop accepting associations and close the open ones."""
        for server in self._servers.values():
            server.shutdown()
        self._servers.clear()
        self.ae.shutdown()

    # -- handlers -------------------------------------------------------------------------

    def _refuse(
        self,
        status: StoreStatus,
        reason: str,
        sop_instance_uid: str,
        caller: str,
        *,
        event: Event | None = None,
        data: bytes | None = None,
    ) -> Dataset:
        """Answer ``status``, log why, report it, and keep the data set in the quarantine."""
        self.counters.refused += 1
        if self.on_refused is not None:
            try:
                self.on_refused(
                    int(status), reason, calling_ae_title=caller, sop_instance_uid=sop_instance_uid
                )
            except Exception:  # counting a refusal must never change the answer
                logger.exception("could not report a refused C-STORE")
        kept = None
        if data is not None and event is not None and self.quarantine is not None:
            request = cast(C_STORE, event.request)
            kept = self.quarantine.keep(
                data,
                QuarantineRecord(
                    stage="intake",
                    status=int(status),
                    reason=reason,
                    sop_instance_uid=sop_instance_uid,
                    sop_class_uid=str(request.AffectedSOPClassUID),
                    transfer_syntax_uid=str(event.context.transfer_syntax),
                    calling_ae_title=caller,
                    peer_address=str(event.assoc.requestor.address),
                ),
            )
            if kept is not None:
                self.counters.quarantined += 1
        logger.warning(
            "C-STORE from %s refused 0x%04X: %s (SOP Instance %s)%s",
            caller,
            status,
            reason,
            sop_instance_uid,
            f"; kept as quarantine/{kept.parent.name}/{kept.name}" if kept else "",
        )
        return _status(status, reason)

    def _open_incoming(self, message: DIMSEMessage, assoc: Association) -> IncomingFile:
        """The spool file of a C-STORE whose data set is arriving, its header written
        (:mod:`dermpacs.intake.arrival`)."""
        command = message.command_set
        context = next(cx for cx in assoc.accepted_contexts if cx.context_id == message.context_id)
        # Names the sender and this listener: spool recovery reads the caller from there.
        header = file_header(
            str(command.AffectedSOPClassUID),
            str(command.AffectedSOPInstanceUID),
            str(context.transfer_syntax[0]),
            assoc.requestor.ae_title,
            self.settings.ae_title,
        )
        incoming = self.spool.open_incoming()
        incoming.write(header)
        return incoming

    def _refuse_spool(self, exc: SpoolError, sop_instance_uid: str, caller: str) -> Dataset:
        if isinstance(exc, SpoolFullError):
            if not self._below_watermark:
                logger.error("intake refused until free space returns: %s", exc)
            self._below_watermark = True
        return self._refuse(StoreStatus.OUT_OF_RESOURCES, str(exc), sop_instance_uid, caller)

    def handle_store(self, event: Event) -> Dataset:
        """Admit, spool, record; answer success only when all three are done.

        The data set is already in the spool's incoming folder, written as it arrived
        (:mod:`dermpacs.intake.arrival`); whatever the answer, it leaves that folder.
        """
        request = cast(C_STORE, event.request)
        caller = event.assoc.requestor.ae_title
        sop_instance = str(request.AffectedSOPInstanceUID)
        arriving = request.DataSet
        if not isinstance(arriving, ArrivingDataSet) or arriving.incoming is None:
            error = getattr(arriving, "error", None)
            if isinstance(error, SpoolError):
                return self._refuse_spool(error, sop_instance, caller)
            raw = arriving.getvalue() if arriving is not None else None
            return self._refuse(
                StoreStatus.CANNOT_UNDERSTAND,
                f"unreadable: {type(error).__name__}" if error else "no data set",
                sop_instance,
                caller,
                event=event,
                data=raw,
            )
        try:
            return self._take(event, arriving.incoming, caller, sop_instance)
        finally:
            arriving.incoming.discard()  # refused or failed: nothing left (committed: no-op)

    def _take(
        self, event: Event, incoming: IncomingFile, caller: str, sop_instance: str
    ) -> Dataset:
        started = time.perf_counter()
        sop_class = str(cast(C_STORE, event.request).AffectedSOPClassUID)
        if incoming.error is not None:
            return self._refuse_spool(incoming.error, sop_instance, caller)
        try:
            with open(incoming.path, "rb") as received:
                admitted = admit(
                    received,
                    affected_sop_class_uid=sop_class,
                    affected_sop_instance_uid=sop_instance,
                    transfer_syntax_uid=str(event.context.transfer_syntax),
                    accepted_sop_classes=self.sop_classes,
                    max_megapixels=self.intake.max_megapixels,
                    keywords=self.priority_rules.keywords,
                )
        except AdmissionRefused as refusal:
            return self._refuse(
                refusal.status,
                refusal.reason,
                sop_instance,
                caller,
                event=event,
                data=incoming.path.read_bytes(),
            )
        try:
            path = incoming.commit(admitted.sop_instance_uid)
        except SpoolError as exc:
            return self._refuse_spool(exc, sop_instance, caller)
        if self._below_watermark:
            self._below_watermark = False
            logger.info("free space above storage.min_free_mb again: intake resumed")
        level = self.priority_rules.level_for(
            calling_ae_title=caller,
            sop_class_uid=admitted.sop_class_uid,
            header=admitted.header_values,
        )
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
                    priority=level,
                ),
                model_version=self.model_version,
                # Lazy: the fsync'd spool file makes the photo durable, and start-up recovery
                # records a row that a power cut took (dermpacs.intake.recovery).
                synchronous_commit=False,
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
            # Taken before (the unique idempotency key says so): its bytes are durable and its
            # job will produce (or produced) the results, so the new file goes. Looking the key
            # up before spooling would cost every photo a write-locked read for the rare resend.
            self.spool.discard(path)
            self.counters.duplicates += 1
            logger.info(
                "C-STORE from %s: SOP Instance %s already taken (job %d, %s)",
                caller,
                sop_instance,
                outcome.job_id,
                outcome.state.value,
            )
            return _status(StoreStatus.SUCCESS)
        self.counters.stored += 1
        self.on_recorded(outcome.job_id, level)
        logger.info(
            "C-STORE from %s: SOP Instance %s -> job %d (%s, %s, %.1f ms)",
            caller,
            sop_instance,
            outcome.job_id,
            "new" if outcome.created else f"restarted, was {JobState.FAILED.value}",
            level,
            (time.perf_counter() - started) * 1000,
        )
        return _status(StoreStatus.SUCCESS)

    def _log_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        response = event.assoc.acceptor.primitive
        diagnostic = getattr(response, "diagnostic", None)
        why = _REJECT_REASONS.get(
            diagnostic or 0,
            f"listener.max_associations ({self.settings.max_associations}) reached",
        )
        called = getattr(requestor.primitive, "called_ae_title", "")
        logger.warning(
            "association from %s (%s) to %s rejected: %s",
            requestor.ae_title,
            requestor.address,
            called,
            why,
        )

    def _log_accepted(self, event: Event) -> None:
        requestor = event.assoc.requestor
        logger.debug("association from %s (%s) accepted", requestor.ae_title, requestor.address)
