"""Skin tone as the Individual Typology Angle (ITA°) of unaffected skin.

ITA° = arctan((L* - 50) / b*) x 180 / pi, from CIELAB (Chardon et al., Int J Cosmet Sci 1991;
categories of Del Bino et al., Br J Dermatol 2006):

============  ==================
very light    ITA > 55
light         41 < ITA <= 55
intermediate  28 < ITA <= 41
tan           10 < ITA <= 28
brown         -30 < ITA <= 10
dark          ITA <= -30
============  ==================

Unaffected skin is skin minus lesion, eroded a little so that mixed pixels at the edge of the
skin and the reddened rim around a lesion do not count. Colours are converted from sRGB with the
D65 white point (IEC 61966-2-1; CIE 15), and the photo's ITA is the median over pixels, which a
few pixels of hair, shadow or glare do not move.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dermpacs.analysis import SKIN

# Lower bounds (exclusive) of each category, from the lightest down.
ITA_CATEGORIES: tuple[tuple[str, float], ...] = (
    ("very_light", 55.0),
    ("light", 41.0),
    ("intermediate", 28.0),
    ("tan", 10.0),
    ("brown", -30.0),
    ("dark", float("-inf")),
)
ITA_CATEGORY_NAMES: tuple[str, ...] = tuple(name for name, _ in ITA_CATEGORIES)

# sRGB (linear) to CIE XYZ, D65 (IEC 61966-2-1), and the D65 reference white (Y = 1).
_SRGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
D65_WHITE = (0.95047, 1.0, 1.08883)
_DELTA = 6.0 / 29.0


class SkinToneError(ValueError):
    """Arrays the skin-tone measure cannot use."""


@dataclass(frozen=True)
class SkinTone:
    """ITA of a photo's unaffected skin, its category and how many pixels it rests on."""

    ita_degrees: float
    category: str
    pixel_count: int


def _srgb_to_linear(values: np.ndarray) -> np.ndarray:
    """The sRGB transfer function undone (IEC 61966-2-1), for values in 0..1."""
    return np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)


_LINEAR_OF_UINT8 = _srgb_to_linear(np.arange(256, dtype=np.float64) / 255.0)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours.

    Parameters
    ----------
    rgb
        ``(..., 3)`` array, uint8 (0-255) or float (0-1).

    Returns
    -------
    numpy.ndarray
        ``(..., 3)`` float64: L* in 0..100, a*, b*.
    """
    rgb = np.asarray(rgb)
    if rgb.shape[-1:] != (3,):
        raise SkinToneError(f"colours must have 3 channels in the last axis, got {rgb.shape}")
    if rgb.dtype == np.uint8:
        linear = _LINEAR_OF_UINT8[rgb]  # the same formula, evaluated once per level
    else:
        linear = _srgb_to_linear(rgb.astype(np.float64))
    # Written out rather than ``linear @ matrix.T``: BLAS on an (N, 3) x (3, 3) product costs
    # several times more than these nine multiply-adds (60 against 16 ms for 150 000 pixels).
    xyz = np.empty_like(linear)
    for row, (matrix_row, white) in enumerate(zip(_SRGB_TO_XYZ, D65_WHITE, strict=True)):
        red, green, blue = matrix_row / white
        xyz[..., row] = red * linear[..., 0] + green * linear[..., 1] + blue * linear[..., 2]
    f = np.where(xyz > _DELTA**3, np.cbrt(xyz), xyz / (3 * _DELTA**2) + 4.0 / 29.0)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def ita_degrees(lightness: np.ndarray, b_star: np.ndarray) -> np.ndarray:
    """ITA° = arctan((L* - 50) / b*) in degrees, element-wise (b* = 0 gives +-90)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (np.asarray(lightness, dtype=np.float64) - 50.0) / np.asarray(b_star, np.float64)
    return np.degrees(np.arctan(np.nan_to_num(ratio, nan=0.0)))


def ita_category(ita: float) -> str:
    """Category name of an ITA value (Del Bino et al. 2006)."""
    for name, lower in ITA_CATEGORIES:
        if ita > lower:
            return name
    return ITA_CATEGORIES[-1][0]


def unaffected_skin_mask(label_map: np.ndarray, erosion_fraction: float = 0.01) -> np.ndarray:
    """Skin that is not lesion, eroded by ``erosion_fraction`` of the short side (at least 1 px)."""
    skin = label_map == SKIN  # lesion pixels are excluded by their own label
    iterations = max(1, round(erosion_fraction * min(label_map.shape)))
    square = np.ones((3, 3), dtype=bool)  # chessboard distance: a square margin
    return ndimage.binary_erosion(skin, structure=square, iterations=iterations, border_value=0)


def measure_skin_tone(
    rgb: np.ndarray,
    label_map: np.ndarray,
    *,
    erosion_fraction: float = 0.01,
    min_pixels: int = 50,
) -> SkinTone | None:
    """Median ITA of the unaffected skin of a photo.

    Parameters
    ----------
    rgb
        ``(rows, columns, 3)`` uint8 photo, at the scale of ``label_map``.
    label_map
        Labels BACKGROUND, SKIN, LESION with the photo's rows and columns.
    erosion_fraction
        Erosion of the unaffected-skin mask, as a fraction of the short side. When erosion leaves
        fewer than ``min_pixels``, the mask is used uneroded.
    min_pixels
        Fewer unaffected-skin pixels than this give ``None``: no skin tone is claimed.

    Raises
    ------
    SkinToneError
        When the photo and label map do not have the same rows and columns.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[:2] != label_map.shape:
        raise SkinToneError(
            f"photo {rgb.shape} and label map {label_map.shape} must have the same rows and columns"
        )
    mask = unaffected_skin_mask(label_map, erosion_fraction)
    if int(mask.sum()) < min_pixels:
        mask = label_map == SKIN
    count = int(mask.sum())
    if count < min_pixels:
        return None
    lab = srgb_to_lab(rgb[mask])
    ita = float(np.median(ita_degrees(lab[:, 0], lab[:, 2])))
    return SkinTone(ita_degrees=ita, category=ita_category(ita), pixel_count=count)
