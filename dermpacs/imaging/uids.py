"""Deterministic UIDs for everything dermpacs creates from one photo.

A retried job must not put a second copy of its results into the PACS, so every UID of an
output object is a function of the source photo's SOP Instance UID, the model version and
what the UID names (``kind``, plus an ``item`` for UIDs of which one object has several).

Scheme (documented in docs/conformance.md): ``2.25.<n>`` where ``n`` is the 128-bit integer
value of an RFC 9562 (formerly RFC 4122) version-5 name-based UUID, in the dermpacs namespace
``DERMPACS_UUID_NAMESPACE``, of the name ``json.dumps([kind, item, model_version, source_uid])``
(compact JSON with the default separators, e.g. ``["seg-series", "", "1.0", "1.2.3"]``).
``2.25`` is the root that PS3.5 B.2 reserves for UIDs derived from UUIDs, so no registered root
is needed and the result is at most 44 characters long (PS3.5 9.1 allows 64).
"""

from __future__ import annotations

import json
import uuid
from enum import StrEnum
from typing import Final

from pydicom.uid import RE_VALID_UID, UID

UUID_DERIVED_ROOT: Final = "2.25"
DERMPACS_UUID_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dermpacs:dicom-uids")
"""The namespace of all dermpacs name-based UUIDs (fixed: changing it changes every UID)."""


class UidKind(StrEnum):
    """What a derived UID identifies."""

    SEG_SERIES = "seg-series"
    SEG_INSTANCE = "seg-instance"
    SR_SERIES = "sr-series"
    SR_INSTANCE = "sr-instance"
    OVERLAY_SERIES = "overlay-series"
    OVERLAY_INSTANCE = "overlay-instance"
    SEGMENT_TRACKING = "segment-tracking"  # item: segment label
    SR_TRACKING = "sr-tracking"  # item: the tracked region's identifier
    DEVICE_OBSERVER = "device-observer"  # per model version; source UID ignored


class UidError(ValueError):
    """A UID cannot be derived from what was given."""


def _is_valid_uid(value: str) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(RE_VALID_UID.match(value))


def derive_uid(
    source_sop_instance_uid: str,
    model_version: str,
    kind: UidKind | str,
    *,
    item: str = "",
) -> UID:
    """Return the UID of ``kind`` for results of ``model_version`` on one source photo.

    Parameters
    ----------
    source_sop_instance_uid : str
        SOP Instance UID of the source photograph.
    model_version : str
        Version of the model (weights and code) that produced the results.
    kind : UidKind or str
        What the UID identifies (a :class:`UidKind` or its value).
    item : str, optional
        Distinguishes several UIDs of one kind (a segment label, a crop's index).

    Returns
    -------
    pydicom.uid.UID
        A valid UID under ``2.25``; equal inputs always give the same UID, and any different
        input gives a different one (up to the 122-bit collision resistance of the UUID).

    Raises
    ------
    UidError
        When the source UID is not a valid UID, the model version is empty or ``kind`` is
        unknown.
    """
    try:
        kind = UidKind(kind)
    except ValueError:
        known = ", ".join(member.value for member in UidKind)
        raise UidError(f"unknown UID kind {kind!r} (known: {known})") from None
    if not model_version:
        raise UidError("model_version is empty: results of unknown models get no UIDs")
    if kind is UidKind.DEVICE_OBSERVER:
        source_sop_instance_uid = ""
    elif not _is_valid_uid(source_sop_instance_uid):
        raise UidError(f"source SOP Instance UID {source_sop_instance_uid!r} is not a valid UID")
    # A JSON array keeps the fields apart whatever characters the free-text ones hold, so no
    # two different inputs give the same name.
    name = json.dumps([kind.value, item, model_version, source_sop_instance_uid])
    return UID(f"{UUID_DERIVED_ROOT}.{uuid.uuid5(DERMPACS_UUID_NAMESPACE, name).int}")


__all__ = ["DERMPACS_UUID_NAMESPACE", "UUID_DERIVED_ROOT", "UidError", "UidKind", "derive_uid"]
