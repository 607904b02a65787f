"""dermpacs: dermatology photographs in, DICOM SEG, SR and overlay back to the PACS."""

__version__ = "0.1.0"
ALGORITHM_NAME = "dermpacs"
