"""Every coded concept dermpacs writes into SEG, SR and overlay objects, in one place.

Each standard code below was checked against the DICOM code tables bundled with pydicom 3.0
(``pydicom.sr.codedict.codes``, generated from PS3.16) or, for SNOMED CT concepts that PS3.16
does not list, against independent public code lists; the source is noted next to each.
``tests/test_sr.py`` compares the codes that pydicom knows with pydicom's own values.

Where no standard concept exists (area fractions of a photograph, the individual typology
angle, crop and quality-flag concepts) the private coding scheme ``99DERMPACS`` is used; it is
declared once, in the SR's Coding Scheme Identification Sequence (PS3.3 C.12.1.1.2.1), and a
private scheme designator starts with "99" as PS3.16 Section 8 asks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Final

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dermpacs.analysis import QualityFlag

# --- private coding scheme -----------------------------------------------------------------

DERMPACS_SCHEME: Final = "99DERMPACS"
"""Private coding scheme designator for concepts that no standard terminology has."""

DERMPACS_SCHEME_NAME: Final = "dermpacs private concepts"
DERMPACS_SCHEME_RESPONSIBLE: Final = "dermpacs project"


def _private(value: str, meaning: str) -> Code:
    return Code(value, DERMPACS_SCHEME, meaning)


def coding_scheme_identification() -> Dataset:
    """Return the Coding Scheme Identification Sequence item that declares ``99DERMPACS``.

    Returns
    -------
    pydicom.dataset.Dataset
        An item for (0008,0110) Coding Scheme Identification Sequence (PS3.3 C.12.1.1.2).
    """
    item = Dataset()
    item.CodingSchemeDesignator = DERMPACS_SCHEME
    item.CodingSchemeName = DERMPACS_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = DERMPACS_SCHEME_RESPONSIBLE
    return item


# --- segmentation (PS3.16 CID 7150 Segmentation Property Categories, CID 7151 Types) ------

# Both categories are members of CID 7150 in pydicom's PS3.16 tables
# (codes.SCT.Tissue, codes.SCT.MorphologicallyAbnormalStructure).
TISSUE: Final = Code("85756007", "SCT", "Tissue")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE: Final = Code(
    "49755003", "SCT", "Morphologically Abnormal Structure"
)
# Both types are members of CID 7151 (codes.SCT.Skin, codes.SCT.Lesion). "Skin" is the whole
# skin surface seen in the photo (lesions are on skin, so the Skin segment includes them);
# "Lesion" is the abnormal skin only.
SKIN: Final = Code("39937001", "SCT", "Skin")
LESION: Final = Code("52988006", "SCT", "Lesion")


# --- disease findings (SNOMED CT) ------------------------------------------------------------


class DiseaseClass(StrEnum):
    """The method's disease classes, keyed by the names in ``ModelSettings.classes``."""

    ATOPIC_DERMATITIS = "atopic_dermatitis"
    MYCOSIS_FUNGOIDES = "mycosis_fungoides"
    IMPETIGO = "impetigo"
    HERPESVIRUS_INFECTION = "herpesvirus_infection"

    @property
    def code(self) -> Code:
        """The SNOMED CT disorder concept reported for this class."""
        return _DISEASE_CODES[self]

    @property
    def label(self) -> str:
        """Words for people (legends, descriptions)."""
        return self.value.replace("_", " ")


_DISEASE_CODES: Final[Mapping[DiseaseClass, Code]] = {
    # In pydicom's PS3.16 tables, CID 4405 Skin Disorder (codes.SCT.AtopicDermatitis).
    DiseaseClass.ATOPIC_DERMATITIS: Code("24079001", "SCT", "Atopic dermatitis"),
    # Not in PS3.16. SNOMED CT 118618005 |Mycosis fungoides (disorder)|, a member of the
    # lymphoreticular-neoplasm value sets of US quality measures; confirm with a SNOMED
    # browser before a clinical deployment (docs/conformance.md).
    DiseaseClass.MYCOSIS_FUNGOIDES: Code("118618005", "SCT", "Mycosis fungoides"),
    # Not in PS3.16. SNOMED CT 48277006 |Impetigo (disorder)|, mapped to ICD-10 L01 in
    # public code lists.
    DiseaseClass.IMPETIGO: Code("48277006", "SCT", "Impetigo"),
    # Not in PS3.16. SNOMED CT 88594005 |Herpes simplex (disorder)|, mapped to ICD-10 B00.9
    # in public code lists. The method's class is "herpesvirus infection" (its training photos
    # are herpes simplex lesions); the narrower, checked concept is reported.
    DiseaseClass.HERPESVIRUS_INFECTION: Code("88594005", "SCT", "Herpes simplex"),
}


class UnknownCodeError(ValueError):
    """A name has no coded concept in dermpacs (an unknown class or category)."""


def disease_class(name: str) -> DiseaseClass:
    """Return the :class:`DiseaseClass` for a configured class name.

    Raises
    ------
    UnknownCodeError
        When ``name`` is not one of the classes dermpacs can code.
    """
    try:
        return DiseaseClass(name)
    except ValueError:
        known = ", ".join(member.value for member in DiseaseClass)
        raise UnknownCodeError(f"no disease code for class {name!r} (known: {known})") from None


def disease_code(name: str) -> Code:
    """Return the SNOMED CT concept for a configured class name (see :func:`disease_class`)."""
    return disease_class(name).code


def check_class_names(class_names: Sequence[str]) -> tuple[DiseaseClass, ...]:
    """Return the classes for ``class_names``, refusing unknown or repeated names.

    Raises
    ------
    UnknownCodeError
        When a name is unknown, repeated, or the list is empty.
    """
    if not class_names:
        raise UnknownCodeError("class_names is empty")
    classes = tuple(disease_class(name) for name in class_names)
    if len(set(classes)) != len(classes):
        raise UnknownCodeError(f"class_names repeats a class: {list(class_names)}")
    return classes


# --- algorithm and provenance ----------------------------------------------------------------

# CID 7162 Surface Processing Algorithm Family, which highdicom uses for algorithm families
# (codes.DCM.ArtificialIntelligence).
ARTIFICIAL_INTELLIGENCE: Final = Code("123110", "DCM", "Artificial Intelligence")

# CID 7005 Contributing Equipment Purpose of Reference (codes.DCM.ProcessingEquipment). The
# standard has no "Processing Algorithm" concept; 109103 is "Modifying Equipment", which
# describes equipment that changed an existing instance, not one that derived new objects.
PROCESSING_EQUIPMENT: Final = Code("109102", "DCM", "Processing Equipment")


# --- SR: procedure, report structure ----------------------------------------------------

# CID 8131 Pathology Imaging Protocol in pydicom's tables (codes.SCT.PhotographyOfPatient):
# the imaging procedure whose results the SR reports. TID 1500 draws Procedure Reported from
# CID 100, which is extensible; it has no photography concept.
PHOTOGRAPHY_OF_PATIENT: Final = Code("197157006", "SCT", "Photography of patient")

# codes.DCM.Probability: a NUM concept for a probability between 0 and 1.
PROBABILITY: Final = Code("122157", "DCM", "Probability")

YES: Final = Code("373066001", "SCT", "Yes")  # CID 230 Yes-No (codes.SCT.Yes)
NO: Final = Code("373067005", "SCT", "No")  # codes.SCT.No

# --- SR: units (UCUM, CID 7181) ----------------------------------------------------------

UNIT_NONE: Final = Code("1", "UCUM", "no units")  # codes.UCUM.NoUnits
UNIT_PERCENT: Final = Code("%", "UCUM", "Percent")  # codes.UCUM.Percent
UNIT_DEGREE: Final = Code("deg", "UCUM", "Degree")  # codes.UCUM.Degree

# --- SR: private concepts (no standard concept exists) -----------------------------------

SKIN_AREA_FRACTION: Final = _private("SKINFRAC", "Skin area fraction of region")
LESION_AREA_FRACTION: Final = _private("LESIONFRAC", "Lesion area fraction of region")
LESION_FRACTION_OF_SKIN: Final = _private("LESIONOFSKIN", "Lesion area fraction of skin")
QUALIFYING_CROP_COUNT: Final = _private("NCROPS", "Number of qualifying crops")
QUALIFYING_CROP: Final = _private("CROP", "Qualifying crop")
WHOLE_PHOTO_FALLBACK: Final = _private("FALLBACK", "Classified from whole photograph")
ATOPIC_DERMATITIS_VS_OTHERS: Final = _private("ADVSOTHERS", "Atopic dermatitis versus others")
NOT_ATOPIC_DERMATITIS: Final = _private("NOTAD", "Other than atopic dermatitis")
INDIVIDUAL_TYPOLOGY_ANGLE: Final = _private("ITA", "Individual typology angle")
SKIN_TONE_CATEGORY: Final = _private("ITACAT", "Skin tone category by ITA")
QUALITY_FLAG: Final = _private("QFLAG", "Result quality flag")


class SkinToneCategory(StrEnum):
    """ITA skin-tone categories (Chardon et al., Int J Cosmet Sci 1991;13:191-208)."""

    VERY_LIGHT = "very light"
    LIGHT = "light"
    INTERMEDIATE = "intermediate"
    TAN = "tan"
    BROWN = "brown"
    DARK = "dark"

    @property
    def code(self) -> Code:
        """The private concept reported for this category."""
        value = "ITA-" + self.name.replace("_", "")
        return _private(value[:16], f"{self.value.capitalize()} skin (ITA)")


def skin_tone_category(name: str) -> SkinToneCategory:
    """Return the category for a name such as ``"very light"`` or ``"very_light"``.

    Raises
    ------
    UnknownCodeError
        When ``name`` is not one of the six ITA categories.
    """
    normalised = name.strip().lower().replace("_", " ").replace("-", " ")
    try:
        return SkinToneCategory(normalised)
    except ValueError:
        known = ", ".join(member.value for member in SkinToneCategory)
        raise UnknownCodeError(f"unknown ITA category {name!r} (known: {known})") from None


_QUALITY_FLAG_CODES: Final[Mapping[QualityFlag, Code]] = {
    QualityFlag.TOO_LITTLE_SKIN: _private("LOWSKIN", "Too little skin in photograph"),
    QualityFlag.NO_QUALIFYING_CROP: _private("NOCROP", "No qualifying crop"),
    QualityFlag.BLUR: _private("BLUR", "Photograph blurred"),
}


def quality_flag_code(flag: QualityFlag) -> Code:
    """Return the private concept reported for a quality flag."""
    return _QUALITY_FLAG_CODES[QualityFlag(flag)]


__all__ = [
    "ARTIFICIAL_INTELLIGENCE",
    "ATOPIC_DERMATITIS_VS_OTHERS",
    "DERMPACS_SCHEME",
    "INDIVIDUAL_TYPOLOGY_ANGLE",
    "LESION",
    "LESION_AREA_FRACTION",
    "LESION_FRACTION_OF_SKIN",
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE",
    "NO",
    "NOT_ATOPIC_DERMATITIS",
    "PHOTOGRAPHY_OF_PATIENT",
    "PROBABILITY",
    "PROCESSING_EQUIPMENT",
    "QUALIFYING_CROP",
    "QUALIFYING_CROP_COUNT",
    "QUALITY_FLAG",
    "SKIN",
    "SKIN_AREA_FRACTION",
    "SKIN_TONE_CATEGORY",
    "TISSUE",
    "UNIT_DEGREE",
    "UNIT_NONE",
    "UNIT_PERCENT",
    "WHOLE_PHOTO_FALLBACK",
    "YES",
    "DiseaseClass",
    "SkinToneCategory",
    "UnknownCodeError",
    "check_class_names",
    "coding_scheme_identification",
    "disease_class",
    "disease_code",
    "quality_flag_code",
    "skin_tone_category",
]
