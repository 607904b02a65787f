import pytest

from dermpacs.inference.versioning import (
    MAX_MODEL_VERSION_CHARS,
    combined_model_version,
    weights_version,
)


def test_weights_version_takes_eight_digest_digits():
    assert weights_version("0.1.0", "ab" * 32) == "0.1.0+abababab"


def test_reference_style_version_fits_dicom_long_string():
    # The shipped weights' version strings: this combination once had 65 characters
    # and every job failed to build its SEG.
    version = combined_model_version(
        weights_version("0.1.0-synthetic", "0" * 64), weights_version("0.1.0-synthetic", "f" * 64)
    )
    assert version == "seg-0.1.0-synthetic+00000000/cls-0.1.0-synthetic+ffffffff"
    assert len(version) <= MAX_MODEL_VERSION_CHARS


def test_too_long_version_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="at most 64"):
        combined_model_version("x" * 40, "y" * 40)
