"""Skin tone: sRGB to CIELAB against published values, ITA and its categories."""

from __future__ import annotations

import numpy as np
import pytest

from dermpacs.analysis import BACKGROUND, LESION, SKIN
from dermpacs.inference.skintone import (
    ITA_CATEGORY_NAMES,
    SkinToneError,
    ita_category,
    ita_degrees,
    measure_skin_tone,
    srgb_to_lab,
    unaffected_skin_mask,
)


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [
        # CIELAB D65 of sRGB primaries and neutrals (B. Lindbloom's calculator; CIE 15:2004).
        ((255, 255, 255), (100.0, 0.0, 0.0)),
        ((0, 0, 0), (0.0, 0.0, 0.0)),
        ((128, 128, 128), (53.585, 0.0, 0.0)),
        ((255, 0, 0), (53.241, 80.092, 67.203)),
        ((0, 255, 0), (87.735, -86.183, 83.179)),
        ((0, 0, 255), (32.297, 79.188, -107.860)),
        ((255, 255, 0), (97.139, -21.554, 94.478)),
    ],
)
def test_srgb_to_lab_known_values(rgb: tuple[int, int, int], lab: tuple[float, ...]) -> None:
    assert srgb_to_lab(np.array(rgb, dtype=np.uint8)) == pytest.approx(lab, abs=0.01)


def test_srgb_to_lab_float_input_and_shape() -> None:
    pixels = np.array([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]]])
    lab = srgb_to_lab(pixels)
    assert lab.shape == (1, 2, 3)
    assert lab[0, 0] == pytest.approx((53.241, 80.092, 67.203), abs=0.01)
    with pytest.raises(SkinToneError):
        srgb_to_lab(np.zeros((2, 2)))


def test_ita_formula() -> None:
    assert ita_degrees(np.array(50.0), np.array(10.0)) == pytest.approx(0.0)
    assert ita_degrees(np.array(60.0), np.array(10.0)) == pytest.approx(45.0)
    assert ita_degrees(np.array(40.0), np.array(10.0)) == pytest.approx(-45.0)
    assert ita_degrees(np.array(70.0), np.array(0.0)) == pytest.approx(90.0)


@pytest.mark.parametrize(
    ("ita", "category"),
    [
        (70.0, "very_light"),
        (55.01, "very_light"),
        (55.0, "light"),
        (41.01, "light"),
        (41.0, "intermediate"),
        (28.0, "tan"),
        (10.01, "tan"),
        (10.0, "brown"),
        (-29.99, "brown"),
        (-30.0, "dark"),
        (-60.0, "dark"),
    ],
)
def test_categories_of_del_bino(ita: float, category: str) -> None:
    assert ita_category(ita) == category
    assert category in ITA_CATEGORY_NAMES


def _photo(skin_rgb: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.zeros((60, 80, 3), dtype=np.uint8)
    rgb[:] = (30, 90, 200)  # blue background
    labels = np.full((60, 80), BACKGROUND, dtype=np.uint8)
    labels[10:50, 10:70] = SKIN
    rgb[10:50, 10:70] = skin_rgb
    labels[25:35, 30:40] = LESION
    rgb[25:35, 30:40] = (200, 30, 30)  # red lesion
    return rgb, labels


@pytest.mark.parametrize(
    ("skin_rgb", "category"),
    [
        ((246, 220, 205), "very_light"),
        ((180, 120, 90), "tan"),
        ((160, 110, 80), "brown"),
        ((90, 60, 45), "dark"),
    ],
)
def test_skin_tone_of_unaffected_skin(skin_rgb: tuple[int, int, int], category: str) -> None:
    rgb, labels = _photo(skin_rgb)
    tone = measure_skin_tone(rgb, labels)
    assert tone is not None
    lab = srgb_to_lab(np.array(skin_rgb, dtype=np.uint8))
    expected = float(np.degrees(np.arctan((lab[0] - 50) / lab[2])))
    # Only the skin colour counts: neither the lesion nor the background moves the median.
    assert tone.ita_degrees == pytest.approx(expected, abs=1e-6)
    assert tone.category == category


def test_erosion_keeps_away_from_lesion_and_edges() -> None:
    _, labels = _photo((200, 150, 120))
    mask = unaffected_skin_mask(labels, erosion_fraction=0.05)  # 3 px on a 60-px short side
    assert not mask[22:38, 27:43].any()  # 3 px around the lesion
    assert not mask[:13].any() and not mask[47:].any()
    assert mask[15:20, 15:25].all()


def test_no_skin_no_tone_and_shape_mismatch() -> None:
    rgb = np.zeros((20, 20, 3), dtype=np.uint8)
    assert measure_skin_tone(rgb, np.zeros((20, 20), dtype=np.uint8)) is None
    with pytest.raises(SkinToneError):
        measure_skin_tone(rgb, np.zeros((20, 21), dtype=np.uint8))
