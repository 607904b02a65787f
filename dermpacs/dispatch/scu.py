"""C-STORE sender: one association, exactly the presentation contexts the objects need.

Each object is proposed with its own SOP class and the transfer syntax it is stored in (plus
the two uncompressed little-endian syntaxes when it is uncompressed, which pynetdicom converts
between), so that a PACS that accepts fewer syntaxes still gets every object it can take.
With :class:`TlsClient` the association runs over TLS (PS3.15 B.1): the peer's certificate is
checked against the given CAs and the host name. :func:`echo` opens its association the same
way, so that testing a destination tests exactly what delivery will do.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

logger = logging.getLogger(__name__)

# C-STORE statuses that mean the object was stored (PS3.4 B.2.3): success and the warnings
# "coercion of data elements", "elements discarded", "data set does not match SOP class".
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class TlsClient:
    """TLS for an association we open: the CAs we trust (the system's when empty) and our
    client certificate, for peers that ask for one."""

    ca_certificates: str = ""
    certificate: str = ""
    private_key: str = ""

    def context(self) -> ssl.SSLContext:
        """An SSL context that checks the peer's certificate and host name (TLS 1.2+).

        Raises
        ------
        OSError, ssl.SSLError
            A certificate or key file cannot be read.
        """
        context = ssl.create_default_context(cafile=self.ca_certificates or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certificate:
            context.load_cert_chain(self.certificate, self.private_key or None)
        return context


@dataclass(frozen=True)
class PeerAddress:
    """Where to send: the called AE title, host and port, our own (calling) AE title, and
    TLS when the peer speaks it."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "DERMPACS"
    tls: TlsClient | None = None

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"

    def associate(self, ae: AE) -> Association:
        """Open an association from ``ae`` to this peer (over TLS when configured)."""
        tls_args = None if self.tls is None else (self.tls.context(), self.host)
        return ae.associate(self.host, self.port, ae_title=self.ae_title, tls_args=tls_args)


@dataclass(frozen=True)
class SenderTimeouts:
    """Association timeouts in seconds and the largest PDU we receive (0: unlimited)."""

    acse: float = 30.0
    dimse: float = 120.0
    network: float = 60.0
    max_pdu_size: int = 0


@dataclass(frozen=True)
class SendResult:
    """What happened to one object: its C-STORE status, or why it was not sent."""

    sop_instance_uid: str
    status: int | None
    error: str | None = None

    @property
    def stored(self) -> bool:
        return self.status is not None and self.status in STORED_STATUSES


def _load(item: Dataset | str | Path) -> Dataset:
    return item if isinstance(item, Dataset) else dcmread(item)


def requested_contexts(datasets: Sequence[Dataset]) -> list[tuple[str, list[str]]]:
    """The presentation contexts for ``datasets``: per SOP class, the syntaxes they need."""
    wanted: dict[str, list[str]] = {}
    for ds in datasets:
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        syntaxes = wanted.setdefault(str(ds.SOPClassUID), [])
        candidates = [syntax, *_UNCOMPRESSED] if not syntax.is_compressed else [syntax]
        for candidate in candidates:
            if str(candidate) not in syntaxes:
                syntaxes.append(str(candidate))
    return list(wanted.items())


def send_instances(
    items: Sequence[Dataset | str | Path],
    peer: PeerAddress,
    timeouts: SenderTimeouts | None = None,
) -> list[SendResult]:
    """Send ``items`` (data sets or DICOM files) over one association.

    Never raises for network trouble: every object gets a :class:`SendResult`, with the
    status the peer answered, or ``status=None`` and the reason it was not sent.

    Raises
    ------
    OSError
        A file cannot be read (a local problem, not the peer's).
    """
    timeouts = timeouts or SenderTimeouts()
    datasets = [_load(item) for item in items]
    if not datasets:
        return []
    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    ae.maximum_pdu_size = timeouts.max_pdu_size
    for sop_class, syntaxes in requested_contexts(datasets):
        ae.add_requested_context(sop_class, syntaxes)
    where = peer.describe()
    try:
        assoc = peer.associate(ae)
    except Exception as exc:  # e.g. name resolution, an unreadable certificate
        reason = f"cannot associate with {where}: {exc}"
        return [SendResult(str(ds.SOPInstanceUID), None, reason) for ds in datasets]
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted or unreachable"
        reason = f"association with {where} {why}"
        return [SendResult(str(ds.SOPInstanceUID), None, reason) for ds in datasets]
    results: list[SendResult] = []
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if not assoc.is_established:
                results.append(SendResult(uid, None, f"association with {where} was lost"))
                continue
            try:
                response = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted context for this class or syntax
                results.append(SendResult(uid, None, f"{where} does not accept it: {exc}"))
                continue
            except Exception as exc:
                results.append(SendResult(uid, None, f"sending to {where} failed: {exc}"))
                continue
            if "Status" not in response:
                results.append(SendResult(uid, None, f"no response from {where} (timeout)"))
                continue
            status = int(response.Status)
            comment = response.get("ErrorComment")
            error = None if status in STORED_STATUSES else f"{where} answered 0x{status:04X}"
            if error and comment:
                error += f" ({comment})"
            results.append(SendResult(uid, status, error))
    finally:
        if assoc.is_established:
            assoc.release()
    for result in results:
        if not result.stored:
            logger.warning("C-STORE of %s: %s", result.sop_instance_uid, result.error)
    return results


@dataclass(frozen=True)
class EchoResult:
    """One C-ECHO: the peer's status, or why there was none.

    ``reachable`` is true when the peer answered at all, also by rejecting the association
    (it is up, but does not accept us: the calling AE title, say).
    """

    address: str
    ok: bool
    reachable: bool
    status: int | None
    detail: str
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def echo(peer: PeerAddress, timeouts: SenderTimeouts | None = None) -> EchoResult:
    """C-ECHO ``peer`` (Verification SOP class, PS3.4 Annex A) and time it.

    The association is opened by :meth:`PeerAddress.associate`, as for C-STORE: over TLS with
    the same CAs, client certificate and host name check when the peer has TLS. Never raises
    for the peer's faults.
    """
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    timeouts = timeouts or SenderTimeouts()
    started = time.perf_counter()
    where = peer.describe()

    def done(ok: bool, reachable: bool, status: int | None, detail: str) -> EchoResult:
        return EchoResult(where, ok, reachable, status, detail, time.perf_counter() - started)

    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = timeouts.acse
    ae.network_timeout = timeouts.network
    ae.dimse_timeout = timeouts.dimse
    ae.add_requested_context(Verification)
    try:
        assoc = peer.associate(ae)
    except Exception as exc:  # name resolution, an unreadable certificate
        return done(False, False, None, f"cannot associate: {exc}")
    if assoc.is_rejected:
        return done(False, True, None, f"association rejected (as {peer.calling_ae_title})")
    if not assoc.is_established:
        why = "refused, unreachable, timed out" + (" or TLS handshake failed" if peer.tls else "")
        return done(False, False, None, f"no answer ({why})")
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in response:
        return done(False, True, None, "no C-ECHO response (timeout)")
    status = int(response.Status)
    if status == 0x0000:
        return done(True, True, status, "success")
    return done(False, True, status, f"answered 0x{status:04X}")
