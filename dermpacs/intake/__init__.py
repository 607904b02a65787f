"""The DICOM listener: C-ECHO and C-STORE, admission, spool."""
