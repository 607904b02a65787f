"""Destinations: where result objects go. A DICOM peer (C-STORE) or a folder.

A destination takes the objects of one job and answers, per object, whether it now holds it.
Neither kind keeps state: the job store records what was delivered.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dermpacs.config import Destination, DispatchSettings
from dermpacs.dispatch.scu import PeerAddress, SenderTimeouts, TlsClient, send_instances
from dermpacs.durable import fsync_directory
from dermpacs.jobs.models import ResultKind


@dataclass(frozen=True)
class DeliveryItem:
    """One result object to deliver."""

    kind: ResultKind
    path: Path
    sop_instance_uid: str
    study_instance_uid: str


@dataclass(frozen=True)
class ItemOutcome:
    """Whether the destination holds the object now, and if not, why.

    ``permanent`` failures are not retried (nothing would change by waiting).
    """

    delivered: bool
    error: str | None = None
    permanent: bool = False


class ResultDestination(Protocol):
    """What dispatch needs of a destination."""

    name: str

    def deliver(self, items: Sequence[DeliveryItem]) -> dict[ResultKind, ItemOutcome]:
        """Deliver ``items``; one outcome per item kind. Never raises for the peer's faults."""
        ...


class DicomDestination:
    """A PACS or other DICOM peer reached by C-STORE."""

    def __init__(self, name: str, peer: PeerAddress, timeouts: SenderTimeouts) -> None:
        self.name = name
        self.peer = peer
        self.timeouts = timeouts

    def deliver(self, items: Sequence[DeliveryItem]) -> dict[ResultKind, ItemOutcome]:
        results = send_instances([item.path for item in items], self.peer, self.timeouts)
        by_uid = {r.sop_instance_uid: r for r in results}
        outcomes: dict[ResultKind, ItemOutcome] = {}
        for item in items:
            result = by_uid.get(item.sop_instance_uid)
            if result is None:
                outcomes[item.kind] = ItemOutcome(False, "the file's SOP Instance UID changed")
            else:
                outcomes[item.kind] = ItemOutcome(result.stored, result.error)
        return outcomes


class FolderDestination:
    """A folder: ``<folder>/<StudyInstanceUID>/<kind>-<SOPInstanceUID>.dcm``.

    Files are copied to a temporary name, fsync'd and renamed, so a reader of the folder
    never sees half a file; writing the same object again replaces it with the same bytes.
    """

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = folder

    def target(self, item: DeliveryItem) -> Path:
        return (
            self.folder / item.study_instance_uid / f"{item.kind.value}-{item.sop_instance_uid}.dcm"
        )

    def deliver(self, items: Sequence[DeliveryItem]) -> dict[ResultKind, ItemOutcome]:
        outcomes: dict[ResultKind, ItemOutcome] = {}
        for item in items:
            target = self.target(item)
            partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(item.path, "rb") as source, open(partial, "wb") as copy:
                    shutil.copyfileobj(source, copy)
                    copy.flush()
                    os.fsync(copy.fileno())
                os.replace(partial, target)
                fsync_directory(target.parent)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    partial.unlink()
                outcomes[item.kind] = ItemOutcome(False, f"cannot write {target}: {exc}")
            else:
                outcomes[item.kind] = ItemOutcome(True)
        return outcomes


def folder_path(destination: Destination, storage_root: Path) -> Path:
    """The folder of a folder destination; relative paths are under ``storage.root``."""
    path = Path(destination.path or destination.name)
    return path if path.is_absolute() else Path(storage_root) / path


def tls_client(destination: Destination) -> TlsClient | None:
    """The TLS settings of a DICOM destination, or None when it is plain."""
    if not destination.tls:
        return None
    return TlsClient(
        ca_certificates=destination.tls_ca_certificates,
        certificate=destination.tls_certificate,
        private_key=destination.tls_private_key,
    )


def peer_address(destination: Destination, dispatch: DispatchSettings) -> PeerAddress:
    """Where a DICOM destination is reached, as we call it, with its TLS settings.

    The one place both delivery (C-STORE) and ``dermpacs destinations test`` / the admin
    page's C-ECHO button get the peer from.
    """
    return PeerAddress(
        ae_title=destination.ae_title,
        host=destination.host,
        port=destination.port,
        calling_ae_title=dispatch.calling_ae_title,
        tls=tls_client(destination),
    )


def open_destination(
    destination: Destination, *, storage_root: Path, dispatch: DispatchSettings
) -> ResultDestination:
    """Build the sender for one configured ``[[destinations]]`` entry."""
    if destination.kind == "folder":
        return FolderDestination(destination.name, folder_path(destination, storage_root))
    return DicomDestination(
        destination.name,
        peer_address(destination, dispatch),
        SenderTimeouts(
            acse=dispatch.acse_timeout,
            dimse=dispatch.dimse_timeout,
            network=dispatch.network_timeout,
            max_pdu_size=dispatch.max_pdu_size,
        ),
    )


def open_destinations(
    destinations: Sequence[Destination], *, storage_root: Path, dispatch: DispatchSettings
) -> Mapping[str, ResultDestination]:
    """All configured destinations by name."""
    return {
        d.name: open_destination(d, storage_root=storage_root, dispatch=dispatch)
        for d in destinations
    }
