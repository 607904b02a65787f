"""What every object dermpacs derives from a photo shares: provenance, dates, the error type.

IHE AI Results (AIR) asks that each result object name the algorithm that made it. dermpacs
does so twice: in the Contributing Equipment Sequence (0018,A001) of every object (purpose of
reference "Processing Equipment", manufacturer and model "dermpacs", the software versions),
and inside the SEG and SR with their own algorithm identification.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, TM

from dermpacs.imaging import codes

SOFTWARE_NAME: Final = "dermpacs"
"""Manufacturer, model name and algorithm name written into every derived object."""


class ResultBuildError(ValueError):
    """A SEG, SR or overlay cannot be built from what was given; the message says why."""


def contributing_equipment(
    software_versions: Sequence[str], contribution_datetime: datetime | None = None
) -> hd.ContributingEquipment:
    """Return the Contributing Equipment item that names dermpacs as the processing algorithm.

    Parameters
    ----------
    software_versions : sequence of str
        The model and software versions that made the result.
    contribution_datetime : datetime.datetime, optional
        When the result was made (the job's time).
    """
    return hd.ContributingEquipment(
        manufacturer=SOFTWARE_NAME,
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=SOFTWARE_NAME,
        software_versions=list(software_versions),
        contribution_datetime=contribution_datetime,
        contribution_description="Automated skin and lesion segmentation and classification",
    )


def source_header(source: Dataset) -> Dataset:
    """Return the source's header (no pixel data) as the builders should copy it.

    Patient and study attributes are copied from the source into every result, in the source's
    character set. Japanese systems write Specific Character Set ``\\ISO 2022 IR 87`` (first
    value empty: the default repertoire); highdicom refuses the empty value, so it is written
    out as ``ISO 2022 IR 6``, its meaning (PS3.3 C.12.1.1.2, PS3.5 6.1.2.5.3).
    """
    header = Dataset()
    for element in source:
        if element.keyword != "PixelData":
            header.add(element)
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    character_sets = source.get("SpecificCharacterSet")
    if isinstance(character_sets, list | MultiValue) and len(character_sets) > 1:
        header.SpecificCharacterSet = [value or "ISO 2022 IR 6" for value in character_sets]
    elif character_sets == "":
        del header.SpecificCharacterSet  # empty: the default repertoire
    return header


def set_content_datetime(dataset: Dataset, when: datetime) -> None:
    """Write ``when`` as Content Date/Time and Instance Creation Date/Time of ``dataset``.

    A retried job passes the job's own time, so that it writes the same values again.
    """
    dataset.ContentDate = DA(when.date())
    dataset.ContentTime = TM(when.time())
    dataset.InstanceCreationDate = DA(when.date())
    dataset.InstanceCreationTime = TM(when.time())


__all__ = [
    "SOFTWARE_NAME",
    "ResultBuildError",
    "contributing_equipment",
    "set_content_datetime",
    "source_header",
]
