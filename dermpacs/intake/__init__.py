"""The DICOM listener: C-ECHO and C-STORE, admission, spool."""

from dermpacs.intake.admission import AdmissionRefused, AdmittedInstance, StoreStatus, admit
from dermpacs.intake.spool import Spool, SpoolError

__all__ = [
    "AdmissionRefused",
    "AdmittedInstance",
    "Spool",
    "SpoolError",
    "StoreStatus",
    "admit",
]
