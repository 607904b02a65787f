"""Quality flags: too little skin, no qualifying crop, blur."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dermpacs.analysis import QualityFlag
from dermpacs.config import QualitySettings
from dermpacs.inference.quality import laplacian_variance, noise_sigma, quality_flags, sharpness


def _textured_photo(seed: int = 0) -> np.ndarray:
    """A sharp 384 x 512 photo-like image: blocks and edges of many sizes."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, size=(12, 16, 3)).astype(np.uint8)
    image = np.kron(coarse, np.ones((32, 32, 1), dtype=np.uint8))
    fine = rng.integers(0, 255, size=(48, 64, 3)).astype(np.uint8)
    image[::2] = np.kron(fine, np.ones((8, 8, 1), dtype=np.uint8))[::2]
    return image


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return (
        ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0))
        .round()
        .astype(np.uint8)
    )


def test_laplacian_variance_of_known_images() -> None:
    assert laplacian_variance(np.full((20, 20, 3), 128, dtype=np.uint8)) == 0.0
    # A single bright pixel in grey 0: Laplacian -4 * 255 at it, 255 at four neighbours.
    image = np.zeros((5, 5, 3), dtype=np.uint8)
    image[2, 2] = 255
    values = np.zeros(9)
    values[4] = -4 * 255.0
    values[[1, 3, 5, 7]] = 255.0
    assert laplacian_variance(image) == pytest.approx(values.var(), rel=1e-4)


def test_noise_estimate_matches_added_noise() -> None:
    rng = np.random.default_rng(1)
    flat = np.full((300, 300), 100.0, dtype=np.float32)
    noisy = flat + rng.normal(0, 5.0, flat.shape).astype(np.float32)
    assert noise_sigma(noisy) == pytest.approx(5.0, rel=0.05)


def test_blur_lowers_sharpness_and_noise_does_not_restore_it() -> None:
    sharp = _textured_photo()
    blurred = _blur(sharp, 2.0)
    rng = np.random.default_rng(2)
    grainy = np.clip(blurred + rng.normal(0, 5, blurred.shape), 0, 255).astype(np.uint8)
    threshold = QualitySettings().min_sharpness
    assert sharpness(sharp) > threshold
    assert sharpness(blurred) < threshold
    # Noise raises the plain variance well above the threshold but not the corrected figure.
    assert laplacian_variance(grainy) > 3 * threshold
    assert sharpness(grainy) < threshold


def test_flags() -> None:
    settings = QualitySettings(min_skin_fraction=0.05, min_sharpness=35.0)
    assert (
        quality_flags(
            skin_fraction=0.5, has_qualifying_crop=True, sharpness=100.0, settings=settings
        )
        == ()
    )
    assert quality_flags(
        skin_fraction=0.01, has_qualifying_crop=False, sharpness=10.0, settings=settings
    ) == (QualityFlag.TOO_LITTLE_SKIN, QualityFlag.NO_QUALIFYING_CROP, QualityFlag.BLUR)
    assert (
        quality_flags(
            skin_fraction=0.05, has_qualifying_crop=True, sharpness=35.0, settings=settings
        )
        == ()
    )
    off = QualitySettings(min_sharpness=0.0)
    assert (
        quality_flags(skin_fraction=1.0, has_qualifying_crop=True, sharpness=0.0, settings=off)
        == ()
    )
