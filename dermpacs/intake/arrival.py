"""C-STORE data sets written to the spool while their fragments arrive.

pynetdicom gathers a data set's P-DATA fragments in memory and hands the whole message to the
C-STORE handler, which then wrote it to the spool and waited for the disk: for a 12-MP camera
photo, 12-15 ms of the 36 ms that the listener spent per photo here (docs/benchmarks.md). Here
each association's DIMSE provider gives every incoming message an :class:`ArrivingDataSet`,
which pynetdicom fills through its ``write`` as usual; for a C-STORE request that writes the
file meta information and then each fragment straight into an
:class:`~dermpacs.intake.spool.IncomingFile`, whose write-back to the disk starts while the
rest is still arriving. The handler is left to admit the photo from the file, fsync its tail
and rename it into the spool.

Other messages (C-ECHO has no data set) keep pynetdicom's in-memory buffer, and so does a
C-STORE whose file could not be opened: the handler refuses it with the error kept in
:attr:`ArrivingDataSet.error`, and what arrived stays available for the quarantine.

Two encoders save the listener pydicom's general machinery for the two small things it
writes per photo: the spool file's file meta information (:func:`file_header`) and the C-STORE
response's command set (:func:`c_store_response_command`), each equal byte for byte to what
pydicom and pynetdicom write (tests/test_intake_arrival.py); together 1.4 ms of the
listener's 6-10 ms of CPU per 640x480 photo here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from io import BytesIO
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from dermpacs.intake.spool import IncomingFile

_C_STORE_RQ = 0x0001  # (0000,0100) Command Field of a C-STORE request, PS3.7 E.1

# Opens the spool file of a C-STORE request whose command set has arrived (its SOP class,
# instance and presentation context are known) and writes the file's header into it.
OpenIncoming = Callable[[DIMSEMessage, Association], IncomingFile]


def _even(value: str, pad: bytes) -> bytes:
    encoded = value.encode("ascii", "replace")
    return encoded + pad if len(encoded) % 2 else encoded


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a 2-byte length (PS3.5 7.1.2)."""
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def file_header(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    sending_ae_title: str,
    receiving_ae_title: str,
) -> bytes:
    """Preamble, "DICM" and the file meta information (PS3.10 7.1) of a received instance.

    The elements and values pynetdicom's ``create_file_meta`` gives (its implementation class
    UID and version name), plus the sending and receiving AE titles (0002,0017), (0002,0018).
    Characters outside ASCII are written as "?".
    """
    elements = b"".join(
        (
            struct.pack("<HH2s2sI", 0x0002, 0x0001, b"OB", b"", 2) + b"\x00\x01",
            _explicit(0x0002, 0x0002, b"UI", _even(sop_class_uid, b"\x00")),
            _explicit(0x0002, 0x0003, b"UI", _even(sop_instance_uid, b"\x00")),
            _explicit(0x0002, 0x0010, b"UI", _even(transfer_syntax_uid, b"\x00")),
            _explicit(0x0002, 0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _explicit(0x0002, 0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
            _explicit(0x0002, 0x0017, b"AE", _even(sending_ae_title, b" ")),
            _explicit(0x0002, 0x0018, b"AE", _even(receiving_ae_title, b" ")),
        )
    )
    group_length = _explicit(0x0002, 0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def _implicit(element: int, value: bytes) -> bytes:
    """One implicit VR little endian element of the command group (PS3.7 6.3.1)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def c_store_response_command(response: C_STORE) -> bytes | None:
    """The encoded command set of a C-STORE response (PS3.7 9.3.1.2), or None when the
    response carries more than its status and an error comment (pynetdicom encodes those)."""
    if (
        response.MessageIDBeingRespondedTo is None
        or response.Status is None
        or response.OffendingElement is not None
        or response.AffectedSOPClassUID is None
        or response.AffectedSOPInstanceUID is None
    ):
        return None
    elements = [
        _implicit(0x0002, _even(str(response.AffectedSOPClassUID), b"\x00")),
        _implicit(0x0100, struct.pack("<H", 0x8001)),  # C-STORE-RSP
        _implicit(0x0120, struct.pack("<H", response.MessageIDBeingRespondedTo)),
        _implicit(0x0800, struct.pack("<H", 0x0101)),  # no data set
        _implicit(0x0900, struct.pack("<H", response.Status)),
    ]
    if response.ErrorComment:
        elements.append(_implicit(0x0902, _even(response.ErrorComment, b" ")))
    elements.append(_implicit(0x1000, _even(str(response.AffectedSOPInstanceUID), b"\x00")))
    body = b"".join(elements)
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


class ArrivingDataSet(BytesIO):
    """A DIMSE message's data set: spooled as it arrives for a C-STORE request.

    It is a ``BytesIO`` because pynetdicom's primitives accept nothing else; for a spooled
    C-STORE the bytes are in :attr:`incoming` and the in-memory buffer stays empty.
    """

    def __init__(self, open_incoming: OpenIncoming, message: DIMSEMessage, assoc: Any) -> None:
        super().__init__()
        self._open_incoming = open_incoming
        self._message = message
        self._assoc = assoc
        self._started = False
        self.incoming: IncomingFile | None = None
        # Why the spool file could not be opened (the data set was kept in memory instead).
        self.error: Exception | None = None

    def write(self, data: Any) -> int:
        if not self._started:  # the first fragment: the command set is complete by now
            self._started = True
            command_field = getattr(self._message.command_set, "CommandField", None)
            if command_field == _C_STORE_RQ:
                try:
                    self.incoming = self._open_incoming(self._message, self._assoc)
                except Exception as exc:  # a bad UID in the command, a full disk: refused later
                    self.error = exc
        if self.incoming is not None:
            return self.incoming.write(data)
        return super().write(data)

    def discard(self) -> None:
        """Remove the spool file if it was never committed (an aborted association)."""
        if self.incoming is not None:
            self.incoming.discard()  # nothing happens to a committed file


class SpoolingDIMSEProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider whose messages carry an :class:`ArrivingDataSet`."""

    open_incoming: OpenIncoming | None = None

    def receive_primitive(self, primitive: Any) -> None:
        if self.message is None and self.open_incoming is not None:
            self.message = DIMSEMessage()
            self.message.data_set = ArrivingDataSet(self.open_incoming, self.message, self.assoc)
        super().receive_primitive(primitive)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a C-STORE response encoded by :func:`c_store_response_command`; anything
        else, or when a handler listens for EVT_DIMSE_SENT, as pynetdicom does."""
        command = c_store_response_command(primitive) if isinstance(primitive, C_STORE) else None
        fits = command is not None and (
            self.maximum_pdu_size == 0 or len(command) + 6 <= self.maximum_pdu_size
        )
        if command is None or not fits or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            super().send_msg(primitive, context_id)
            return
        p_data = P_DATA()
        p_data.presentation_data_value_list.append((context_id, b"\x03" + command))  # last
        self.dul.send_pdu(p_data)

    def discard_unfinished(self) -> None:
        """Remove the spool files of messages that never reached the handler: the one still
        arriving and those queued when the association ended."""
        pending = [self.message] if self.message is not None else []
        pending += [item[1] for item in list(self.msg_queue.queue)]
        for message in pending:
            data_set = getattr(message, "data_set", None) or getattr(message, "DataSet", None)
            if isinstance(data_set, ArrivingDataSet):
                data_set.discard()


def spool_on_arrival(assoc: Association, open_incoming: OpenIncoming | None) -> None:
    """Make a new acceptor association spool C-STORE data sets as they arrive.

    Its DIMSE provider is re-classed (it gains behaviour, no state of its own beyond
    ``open_incoming``); with ``open_incoming`` None nothing changes.
    """
    if open_incoming is None:
        return
    assoc.dimse.__class__ = SpoolingDIMSEProvider
    assert isinstance(assoc.dimse, SpoolingDIMSEProvider)
    assoc.dimse.open_incoming = open_incoming
