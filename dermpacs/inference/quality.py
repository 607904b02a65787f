"""Quality checks that make a result one to read with care; each becomes a flag in the SR.

- too little skin: skin (lesion included) covers less than ``min_skin_fraction`` of the photo;
- no qualifying crop: no window met the crop rule, so the whole photo was classified;
- blur: the :func:`sharpness` of the grey photo at the analysis scale is below ``min_sharpness``.

Sharpness is the variance of the Laplacian (Pech-Pacheco et al., ICPR 2000) less the part that
sensor noise contributes: white noise of standard deviation s adds 20 s^2 to that variance (the
squares of the 4-neighbour kernel sum to 20), and s is estimated with Immerkaer's operator (Comput
Vis Image Underst 1996), which cancels image structure. Without the correction a blurred but
grainy photo reads as sharp: on the calibration set below, plain variance ranged up to 150 for
photos blurred by sigma 1.5 px with noise, above the lowest sharp photos.

Calibration of the default (``QualitySettings.min_sharpness`` = 35, analysis long side 512):
six photographs shipped with scikit-image 0.26 (astronaut, chelsea, coffee, horse, retina,
rocket), sharp or blurred by a Gaussian of sigma 1.5 and 2 px at the analysis scale, each with
noise of sd 1 and 4; and 60 synthetic photos of ``dermpacs.training.synth`` (seed 23), sharp when
their camera blur was at most 0.5 px, blurred when at least 1.2 px. At 35, 1 of 40 sharp photos
was flagged (a synthetic close-up of nearly uniform skin, 20.7) and 1 of 33 blurred ones was
missed (a synthetic photo at sigma 1.5 with heavy JPEG artefacts, 66). Measured at the analysis
scale, so that the figure does not depend on the camera's resolution; a different ``long_side``
needs its own threshold.
"""

from __future__ import annotations

import numpy as np

from dermpacs.analysis import QualityFlag
from dermpacs.config import QualitySettings

# ITU-R BT.601 luma weights: the usual grey for a photograph.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _laplacian(grey: np.ndarray) -> np.ndarray:
    # Interior pixels only: no padding rule invents edges at the border.
    return (
        grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * grey[1:-1, 1:-1]
    )


def laplacian_variance(rgb: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image (grey levels 0-255).

    Parameters
    ----------
    rgb
        ``(rows, columns, 3)`` uint8 photo, normally at the analysis scale.

    Returns
    -------
    float
        Higher is sharper; 0 for a flat image or one smaller than 3 x 3.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"a photo must have shape (rows, columns, 3), got {rgb.shape}")
    if rgb.shape[0] < 3 or rgb.shape[1] < 3:
        return 0.0
    grey = rgb.astype(np.float32) @ _LUMA
    return float(_laplacian(grey).var(dtype=np.float64))


def noise_sigma(grey: np.ndarray) -> float:
    """Standard deviation of white noise in a grey image (Immerkaer 1996).

    The operator ``[[1, -2, 1], [-2, 4, -2], [1, -2, 1]]`` is the difference of two Laplacians;
    it is near zero on smooth image structure and passes noise:
    ``sigma = sqrt(pi / 2) / (6 (W - 2) (H - 2)) * sum |I * N|``.
    """
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0
    rows = grey[:-2] - 2.0 * grey[1:-1] + grey[2:]  # the kernel is separable: [1, -2, 1] twice
    response = rows[:, :-2] - 2.0 * rows[:, 1:-1] + rows[:, 2:]
    return float(np.sqrt(np.pi / 2.0) * np.abs(response).mean(dtype=np.float64) / 6.0)


def sharpness(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey photo less the share of noise (0 or more).

    Parameters
    ----------
    rgb
        ``(rows, columns, 3)`` uint8 photo at the analysis scale.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"a photo must have shape (rows, columns, 3), got {rgb.shape}")
    grey = rgb.astype(np.float32) @ _LUMA
    variance = _laplacian(grey).var(dtype=np.float64) if min(grey.shape) >= 3 else 0.0
    return max(0.0, float(variance) - 20.0 * noise_sigma(grey) ** 2)


def quality_flags(
    *,
    skin_fraction: float,
    has_qualifying_crop: bool,
    sharpness: float,
    settings: QualitySettings,
) -> tuple[QualityFlag, ...]:
    """The flags a result carries, in a fixed order.

    Parameters
    ----------
    skin_fraction
        Skin, lesion included, as a fraction of the photo.
    has_qualifying_crop
        Whether any window met the crop rule.
    sharpness
        :func:`sharpness` of the photo at the analysis scale.
    settings
        Thresholds; ``min_sharpness`` 0 turns the blur check off.
    """
    flags: list[QualityFlag] = []
    if skin_fraction < settings.min_skin_fraction:
        flags.append(QualityFlag.TOO_LITTLE_SKIN)
    if not has_qualifying_crop:
        flags.append(QualityFlag.NO_QUALIFYING_CROP)
    if settings.min_sharpness > 0 and sharpness < settings.min_sharpness:
        flags.append(QualityFlag.BLUR)
    return tuple(flags)
