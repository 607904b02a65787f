"""The model version a job is keyed by and the DICOM results carry: one format, no torch import.

``seg-<version>+<sha8>/cls-<version>+<sha8>``: both networks' own version strings and the first
eight hex digits of their tensor digests, so that retrained tensors under an unchanged version
string still give a new version. The results write it into Long String (LO) attributes
(SoftwareVersions, the algorithm version of SEG and SR), which hold at most 64 characters
(PS3.5 6.2), so a longer version is refused when the models are loaded rather than when every
job tries to build its results.
"""

from __future__ import annotations

DIGEST_CHARS = 8
MAX_MODEL_VERSION_CHARS = 64  # LO, PS3.5 table 6.2-1


def weights_version(version: str, payload_sha256: str) -> str:
    """``version+<first 8 hex digits of the digest>`` for one weights file."""
    return f"{version}+{payload_sha256[:DIGEST_CHARS]}"


def combined_model_version(segmentation: str, classifier: str) -> str:
    """Join the two :func:`weights_version` strings; refuse one too long for DICOM LO.

    Raises
    ------
    ValueError
        The combined version has more than 64 characters.
    """
    combined = f"seg-{segmentation}/cls-{classifier}"
    if len(combined) > MAX_MODEL_VERSION_CHARS:
        raise ValueError(
            f"model version {combined!r} has {len(combined)} characters; DICOM Long String "
            f"attributes hold at most {MAX_MODEL_VERSION_CHARS}: shorten the weights' versions"
        )
    return combined
