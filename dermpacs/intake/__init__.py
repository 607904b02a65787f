"""The DICOM listener: C-ECHO and C-STORE, admission, spool."""

from dermpacs.intake.admission import AdmissionRefused, AdmittedInstance, StoreStatus, admit
from dermpacs.intake.quarantine import Quarantine, QuarantineRecord
from dermpacs.intake.spool import Spool, SpoolError, SpoolFullError

__all__ = [
    "AdmissionRefused",
    "AdmittedInstance",
    "Quarantine",
    "QuarantineRecord",
    "Spool",
    "SpoolError",
    "SpoolFullError",
    "StoreStatus",
    "admit",
]
