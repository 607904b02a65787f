"""The one call the worker makes: SEG, SR and overlay for one analysed photo.

All three objects go into the source's study, each in its own new series, with UIDs derived
from the source SOP Instance UID and the model version (:mod:`dermpacs.imaging.uids`): the same
photo analysed again by the same model gives objects with the same UIDs, so a retried job
replaces rather than duplicates its results in the PACS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset

from dermpacs.analysis import PhotoAnalysis
from dermpacs.imaging.derived import ResultBuildError
from dermpacs.imaging.overlay import DEFAULT_MAX_LONG_SIDE, build_overlay
from dermpacs.imaging.seg import build_segmentation
from dermpacs.imaging.sr import build_report
from dermpacs.imaging.uids import UidKind, derive_uid


@dataclass(frozen=True)
class ResultObjects:
    """The three result objects of one photo, ready to be written or sent."""

    seg: Dataset
    sr: Dataset
    overlay: Dataset

    def as_dict(self) -> dict[str, Dataset]:
        """Return the objects keyed by the names destinations use (``seg``, ``sr``, ``overlay``)."""
        return {"seg": self.seg, "sr": self.sr, "overlay": self.overlay}


def build_results(
    source: Dataset,
    rgb: np.ndarray,
    analysis: PhotoAnalysis,
    *,
    algorithm_version: str,
    class_names: Sequence[str],
    content_datetime: datetime | None = None,
    max_overlay_long_side: int | None = DEFAULT_MAX_LONG_SIDE,
) -> ResultObjects:
    """Build SEG, SR and overlay Secondary Capture for one analysed photo.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The received photograph.
    rgb : numpy.ndarray
        Its decoded pixels, ``(Rows, Columns, 3)`` uint8.
    analysis : dermpacs.analysis.PhotoAnalysis
        What the method found.
    algorithm_version : str
        The model version; with the source SOP Instance UID it determines every output UID.
    class_names : sequence of str
        The configured classes (``ModelSettings.classes``).
    content_datetime : datetime.datetime, optional
        The job's time (e.g. when the photo was received), written as Content Date/Time so
        that a retried job writes the same values; ``None`` uses the build time.
    max_overlay_long_side : int or None, optional
        Long side of the overlay image at most (see :func:`build_overlay`).

    Returns
    -------
    ResultObjects

    Raises
    ------
    ResultBuildError
        When the inputs are inconsistent (shapes, classes, values) or the source lacks what
        the objects need.
    dermpacs.imaging.codes.UnknownCodeError
        When a class name or ITA category has no code (a subclass of ``ValueError``).
    """
    uid = source.get("SOPInstanceUID")
    if not uid:
        raise ResultBuildError("the source has no SOP Instance UID")
    if analysis.model_version and analysis.model_version != algorithm_version:
        raise ResultBuildError(
            f"analysis is from model {analysis.model_version!r}, "
            f"results were asked for {algorithm_version!r}"
        )

    def new_uid(kind: UidKind) -> str:
        return derive_uid(uid, algorithm_version, kind)

    seg = build_segmentation(
        source,
        analysis.label_map,
        algorithm_version=algorithm_version,
        series_instance_uid=new_uid(UidKind.SEG_SERIES),
        sop_instance_uid=new_uid(UidKind.SEG_INSTANCE),
        content_datetime=content_datetime,
    )
    sr = build_report(
        source,
        analysis,
        seg_dataset=seg,
        class_names=class_names,
        algorithm_version=algorithm_version,
        series_instance_uid=new_uid(UidKind.SR_SERIES),
        sop_instance_uid=new_uid(UidKind.SR_INSTANCE),
        content_datetime=content_datetime,
    )
    overlay = build_overlay(
        source,
        rgb,
        analysis,
        algorithm_version=algorithm_version,
        series_instance_uid=new_uid(UidKind.OVERLAY_SERIES),
        sop_instance_uid=new_uid(UidKind.OVERLAY_INSTANCE),
        content_datetime=content_datetime,
        max_long_side=max_overlay_long_side,
    )
    return ResultObjects(seg=seg, sr=sr, overlay=overlay)


__all__ = ["ResultObjects", "build_results"]
