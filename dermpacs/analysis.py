"""What the method finds in one photograph: the hand-over from inference to the DICOM writers.

Plain data, no behaviour: ``dermpacs.inference`` produces a :class:`PhotoAnalysis`,
``dermpacs.imaging`` turns one into SEG, SR and overlay. Neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

# Label values of the segmentation map (and of the training masks on disk).
BACKGROUND, SKIN, LESION = 0, 1, 2


class QualityFlag(StrEnum):
    """Reasons to read a result with care; each is reported in the SR."""

    TOO_LITTLE_SKIN = "too_little_skin"
    NO_QUALIFYING_CROP = "no_qualifying_crop"
    BLUR = "blur"


@dataclass(frozen=True)
class Crop:
    """One window that met the method's rule, in source pixels.

    ``box`` is ``(row0, col0, row1, col1)`` with exclusive ends.
    """

    box: tuple[int, int, int, int]
    skin_fraction: float
    lesion_fraction: float
    probabilities: dict[str, float]


@dataclass(frozen=True)
class PhotoAnalysis:
    """Everything the method reports for one photo.

    ``label_map`` has the source's Rows x Columns with values BACKGROUND, SKIN, LESION.
    Fractions are of the whole photo, except ``lesion_fraction_of_skin``. Lesion pixels
    count as skin in ``skin_fraction``. ``probabilities`` is the mean over ``crops`` (or the
    whole photo when ``whole_image_fallback``), keyed by class name from the configuration.
    """

    label_map: np.ndarray
    skin_fraction: float
    lesion_fraction: float
    lesion_fraction_of_skin: float
    crops: tuple[Crop, ...]
    probabilities: dict[str, float]
    finding: str
    atopic_dermatitis_probability: float
    ita_degrees: float | None
    ita_category: str | None
    quality_flags: tuple[QualityFlag, ...] = ()
    whole_image_fallback: bool = False
    model_version: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def is_atopic_dermatitis(self) -> bool:
        """Atopic dermatitis vs the others: the method's binary question."""
        return self.finding == "atopic_dermatitis"
