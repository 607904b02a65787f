"""Receiving processes: associations served by several processes behind one port.

A pynetdicom listener serves every association in threads of one interpreter, so concurrent
associations share one core's worth of Python (docs/benchmarks.md: 51 photos/s at 12 MP over
one association or four). With ``listener.processes = N`` the listening process accepts each
connection (allow-list included) and hands the connected socket (``SCM_RIGHTS`` over a Unix
socket pair) to whichever of N processes — itself and N - 1 receiving processes — serves the
fewest associations; that process does the TLS handshake, the association and every C-STORE
(admit, spool, job row) exactly as the listening process would.

Publishing and refusal records stay in the listening process: a receiving process sends each
recorded job id and each refusal back over its socket pair, so one publisher and one refusal log
serve them all. A receiving process that dies loses only its open associations (their senders
see the connection drop and send again; what it acknowledged is in the spool and the job store);
it is started again, and a hand-off that fails is served by the listening process itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dermpacs.config import Settings

logger = logging.getLogger(__name__)

_MESSAGE_SIZE = 65536  # one JSON message (a refusal's reason is at most a few hundred bytes)
_RESTART_DELAY = 1.0  # seconds before a receiving process that died is started again


@dataclass
class _Slot:
    """One receiving process, as the listening process sees it."""

    index: int
    channel: socket.socket | None = None
    process: multiprocessing.process.BaseProcess | None = None
    ready: bool = False
    active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ReceiverPool:
    """The receiving processes of a listening process, and the choice of who serves what.

    Parameters
    ----------
    settings
        The configuration each receiving process opens the spool and job store with.
    model_version
        As for :class:`~dermpacs.intake.listener.Listener`.
    count
        How many receiving processes (``listener.processes - 1``).
    on_recorded
        Called in this process with each job id and level a receiving process recorded.
    on_refused
        Called in this process for each refusal a receiving process answered.
    prepare
        A module-level function each receiving process calls first (log settings that keep
        patient data out of its log); None: nothing.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        model_version: str,
        count: int,
        on_recorded: Callable[[int, str], None],
        on_refused: Callable[..., None] | None = None,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._model_version = model_version
        self._on_recorded = on_recorded
        self._on_refused = on_refused
        self._prepare = prepare
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(index=i + 1) for i in range(count)]
        self._local_active = 0
        self._choice = threading.Lock()
        self._turn = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- the listening process's side -----------------------------------------------------

    def start(self, *, ready_timeout: float = 60.0) -> ReceiverPool:
        """Start every receiving process and wait until each can take associations (those
        that are not ready in ``ready_timeout`` are skipped until they are)."""
        for slot in self._slots:
            self._spawn(slot)
        for slot in self._slots:
            thread = threading.Thread(
                target=self._serve_slot, args=(slot,), name=f"dermpacs-receiver-{slot.index}"
            )
            thread.daemon = True
            thread.start()
            self._threads.append(thread)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline and not all(s.ready for s in self._slots):
            time.sleep(0.02)
        for slot in self._slots:
            if not slot.ready:
                logger.warning("receiving process %d not ready yet", slot.index)
        return self

    @property
    def pids(self) -> list[int]:
        """The process ids of the receiving processes that run now."""
        return [s.process.pid for s in self._slots if s.process is not None and s.process.pid]

    def ready_count(self) -> int:
        """How many receiving processes take associations now."""
        with self._choice:
            return sum(1 for s in self._slots if s.ready)

    def _spawn(self, slot: _Slot) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = self._context.Process(
            target=_receiver_main,
            args=(
                self._settings,
                self._model_version,
                theirs,
                slot.index,
                self._prepare,
                logging.getLogger().getEffectiveLevel(),
            ),
            name=f"dermpacs-receiver-{slot.index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        slot.channel, slot.process, slot.ready, slot.active = ours, process, False, 0
        logger.info("receiving process %d started (pid %d)", slot.index, process.pid)

    def hand_off(self, request: socket.socket, client_address: Any, kind: str) -> bool:
        """Called by the listening server for each accepted connection: True when a receiving
        process took it (the caller closes its own copy), False to serve it here."""
        with self._choice:
            # The fewest open associations; ties taken in turn (None: this process).
            choices: list[_Slot | None] = [None, *(s for s in self._slots if s.ready)]
            self._turn = (self._turn + 1) % len(choices)
            turned = choices[self._turn :] + choices[: self._turn]
            chosen = min(turned, key=self._load)
            if chosen is None:
                self._local_active += 1
            else:
                chosen.active += 1
            logger.debug(
                "association from %s: %s (serving %s)",
                client_address[0],
                "listening process" if chosen is None else f"receiving process {chosen.index}",
                self._counts(),
            )
            if chosen is None:
                return False
        header = json.dumps({"take": kind, "address": list(client_address)[:2]}).encode()
        try:
            with chosen.lock:
                assert chosen.channel is not None
                socket.send_fds(chosen.channel, [header], [request.fileno()])
            return True
        except OSError as exc:
            logger.warning(
                "receiving process %d unreachable (%s): association served here", chosen.index, exc
            )
            with self._choice:
                chosen.active = max(0, chosen.active - 1)
                self._local_active += 1
            return False

    def serving(self) -> list[int]:
        """How many associations each process serves now: the listening process first, then
        each receiving process in order."""
        with self._choice:
            return self._counts()

    def _counts(self) -> list[int]:  # under self._choice
        return [self._local_active, *(s.active for s in self._slots)]

    def _load(self, slot: _Slot | None) -> int:
        return self._local_active if slot is None else slot.active

    def local_finished(self) -> None:
        """Called when an association this process served has ended."""
        with self._choice:
            self._local_active = max(0, self._local_active - 1)

    def _serve_slot(self, slot: _Slot) -> None:
        """Read one receiving process's messages; start it again when it dies."""
        while True:
            channel = slot.channel
            assert channel is not None
            while True:
                try:
                    data = channel.recv(_MESSAGE_SIZE)
                except OSError:
                    data = b""
                if not data:
                    break
                self._handle_message(slot, data)
            with self._choice:
                slot.ready, slot.active = False, 0
            process = slot.process
            if process is not None:
                process.join(5)
            channel.close()
            if self._stopping.is_set():
                return
            logger.error(
                "receiving process %d (pid %s) ended (exit code %s); starting another",
                slot.index,
                process.pid if process else "?",
                process.exitcode if process else "?",
            )
            if self._stopping.wait(_RESTART_DELAY):
                return
            self._spawn(slot)

    def _handle_message(self, slot: _Slot, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            logger.error("receiving process %d sent an unreadable message", slot.index)
            return
        if "recorded" in message:
            job_id, level = message["recorded"]
            self._on_recorded(int(job_id), str(level))
        elif "refused" in message:
            if self._on_refused is not None:
                refusal = message["refused"]
                self._on_refused(
                    int(refusal["status"]),
                    str(refusal["reason"]),
                    calling_ae_title=str(refusal["calling_ae_title"]),
                    sop_instance_uid=str(refusal["sop_instance_uid"]),
                )
        elif "finished" in message:
            with self._choice:
                slot.active = max(0, slot.active - 1)
        elif "ready" in message:
            with self._choice:
                slot.ready = True
            logger.debug("receiving process %d ready (pid %s)", slot.index, message["ready"])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every receiving process (their open associations are aborted) and wait until
        what they recorded has been handed on."""
        self._stopping.set()
        for slot in self._slots:
            with slot.lock, contextlib.suppress(OSError):
                if slot.channel is not None:
                    slot.channel.send(b'{"stop": true}')
        for thread in self._threads:
            thread.join(timeout)
        for slot in self._slots:
            process = slot.process
            if process is not None and process.exitcode is None:
                process.join(max(0.0, timeout))
                if process.exitcode is None:
                    logger.warning("receiving process %d did not stop; killed", process.pid)
                    process.kill()
                    process.join(5)
        self._threads.clear()


# -- the receiving process's side ---------------------------------------------------------


class _Channel:
    """The receiving process's end of its socket pair; sends from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode()
        with self._lock, contextlib.suppress(OSError):  # the listening process is gone
            self.sock.send(data)

    def recorded(self, job_id: int, level: str) -> None:
        self.send({"recorded": [job_id, level]})

    def refused(
        self, status: int, reason: str, *, calling_ae_title: str, sop_instance_uid: str
    ) -> None:
        self.send(
            {
                "refused": {
                    "status": status,
                    "reason": reason,
                    "calling_ae_title": calling_ae_title,
                    "sop_instance_uid": sop_instance_uid,
                }
            }
        )


def _receiver_main(
    settings: Settings,
    model_version: str,
    sock: socket.socket,
    index: int,
    prepare: Callable[[], None] | None,
    log_level: int,
) -> None:
    """A receiving process: serve the connections handed over ``sock`` until told to stop or
    until the listening process is gone."""
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s %(name)s[receiver {index}]: %(message)s",
    )
    if prepare is not None:
        prepare()
    from dermpacs.intake.listener import Listener
    from dermpacs.jobs.store import JobStore

    channel = _Channel(sock)
    store = JobStore.from_settings(settings, actor="listener")
    listener = Listener.from_settings(
        settings,
        store=store,
        model_version=model_version,
        on_recorded=channel.recorded,
        on_refused=channel.refused,
    )
    listener.adopt(on_finished=lambda: channel.send({"finished": True}))
    channel.send({"ready": multiprocessing.current_process().pid})
    try:
        while True:
            try:
                data, fds, _flags, _address = socket.recv_fds(sock, _MESSAGE_SIZE, 1)
            except OSError:
                break
            if not data:  # the listening process is gone
                break
            message = json.loads(data)
            if "take" not in message:  # stop
                for fd in fds:
                    socket.close(fd)
                break
            if not fds:
                logger.error("a hand-off arrived without its connection")
                continue
            request = socket.socket(fileno=fds[0])
            listener.take(request, tuple(message["address"]), message["take"])
    finally:
        listener.shutdown()
        store.dispose()
        sock.close()
