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
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from io import BytesIO
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage

from dermpacs.intake.spool import IncomingFile

logger = logging.getLogger(__name__)

_C_STORE_RQ = 0x0001  # (0000,0100) Command Field of a C-STORE request, PS3.7 E.1

# Opens the spool file of a C-STORE request whose command set has arrived (its SOP class,
# instance and presentation context are known) and writes the file's header into it.
OpenIncoming = Callable[[DIMSEMessage, Association], IncomingFile]


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
        if self.incoming is not None and self.incoming.open:
            self.incoming.discard()


class SpoolingDIMSEProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider whose messages carry an :class:`ArrivingDataSet`."""

    open_incoming: OpenIncoming | None = None

    def receive_primitive(self, primitive: Any) -> None:
        if self.message is None and self.open_incoming is not None:
            self.message = DIMSEMessage()
            self.message.data_set = ArrivingDataSet(self.open_incoming, self.message, self.assoc)
        super().receive_primitive(primitive)

    def discard_unfinished(self) -> None:
        """Remove the spool files of messages that never reached the handler: the one still
        arriving and those queued when the association ended."""
        pending = [self.message] if self.message is not None else []
        with contextlib.suppress(IndexError):
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


def discard_unanswered(assoc: Association, wait: float = 5.0) -> None:
    """Remove the spool files an ended association left unanswered (aborted mid-photo).

    Called once the association's thread has ended; its DUL thread, which writes the
    fragments, is given ``wait`` seconds to end too, and if it has not, nothing is touched
    (start-up clears the incoming folder).
    """
    if not isinstance(assoc.dimse, SpoolingDIMSEProvider):
        return
    assoc.dul.join(wait)
    if assoc.dul.is_alive():
        logger.warning("association's reader still running: its incoming spool file is left")
        return
    assoc.dimse.discard_unfinished()
