"""The crop rule on hand-made label maps whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from dermpacs.analysis import BACKGROUND, LESION, SKIN
from dermpacs.inference.crops import (
    CropError,
    cut_crops,
    cut_whole_photo,
    integral_image,
    map_box,
    select_crops,
    select_truth_crops,
)

# One window exactly the size of the map: the rule then judges the whole map.
WHOLE = {"window_fractions": [1.0], "stride_fraction": 1.0}


def _map_with(skin: int, lesion: int, side: int = 10) -> np.ndarray:
    """A square map: ``lesion`` lesion pixels, then ``skin`` skin pixels, the rest background."""
    flat = np.full(side * side, BACKGROUND, dtype=np.uint8)
    flat[:lesion] = LESION
    flat[lesion : lesion + skin] = SKIN
    return flat.reshape(side, side)


def test_exactly_80_percent_skin_is_refused_and_81_accepted() -> None:
    # 20 lesion + 60 skin = 80 % skin (lesion counts as skin): not strictly more than 80 %.
    assert select_crops(_map_with(skin=60, lesion=20), **WHOLE) == []
    assert len(select_crops(_map_with(skin=61, lesion=20), **WHOLE)) == 1


def test_80_1_percent_skin_is_accepted() -> None:
    # 100 x 100 window: 8000 pixels are 80.0 %, 8010 are 80.1 %, 8001 are 80.01 %.
    assert select_crops(_map_with(skin=6000, lesion=2000, side=100), **WHOLE) == []
    assert len(select_crops(_map_with(skin=6010, lesion=2000, side=100), **WHOLE)) == 1
    assert len(select_crops(_map_with(skin=6001, lesion=2000, side=100), **WHOLE)) == 1
    assert integral_image(_map_with(skin=6010, lesion=2000, side=100) != BACKGROUND)[-1, -1] == 8010


def test_exactly_10_percent_lesion_is_refused() -> None:
    assert select_crops(_map_with(skin=90, lesion=10), **WHOLE) == []
    crops = select_crops(_map_with(skin=89, lesion=11), **WHOLE)
    assert len(crops) == 1
    assert crops[0].lesion_fraction == pytest.approx(0.11)
    assert crops[0].skin_fraction == pytest.approx(1.0)


def test_lesion_counts_as_skin() -> None:
    all_lesion = np.full((10, 10), LESION, dtype=np.uint8)
    crops = select_crops(all_lesion, **WHOLE)
    assert len(crops) == 1
    assert crops[0].skin_fraction == 1.0 and crops[0].lesion_fraction == 1.0


def test_thresholds_are_configurable() -> None:
    label_map = _map_with(skin=50, lesion=5)  # 55 % skin, 5 % lesion
    assert select_crops(label_map, **WHOLE) == []
    assert len(select_crops(label_map, min_skin_fraction=0.5, min_lesion_fraction=0.04, **WHOLE))


def test_windows_find_the_lesion_and_stay_on_skin() -> None:
    # 200 x 300 map: skin on the left 200 columns, a 30 x 30 lesion at rows 80..110, cols 60..90.
    label_map = np.zeros((200, 300), dtype=np.uint8)
    label_map[:, :200] = SKIN
    label_map[80:110, 60:90] = LESION
    crops = select_crops(label_map, window_fractions=[0.3], stride_fraction=0.1, max_overlap=0.0)
    assert crops, "a 60-pixel window around the lesion qualifies"
    best = crops[0]
    r0, c0, r1, c1 = best.analysis_box
    assert r1 - r0 == c1 - c0 == 60
    assert c1 <= 200 + 60 * 0.2  # at most 20 % of the window is background
    # Best window: lesion 900 of 3600 pixels = 25 %, the largest share possible at this size.
    assert best.lesion_fraction == pytest.approx(0.25)
    for crop in crops:
        assert crop.skin_fraction > 0.8 and crop.lesion_fraction > 0.1
        window = label_map[
            crop.analysis_box[0] : crop.analysis_box[2], crop.analysis_box[1] : crop.analysis_box[3]
        ]
        assert np.mean(window != BACKGROUND) == pytest.approx(crop.skin_fraction)
        assert np.mean(window == LESION) == pytest.approx(crop.lesion_fraction)


def test_fractions_match_brute_force_for_every_window() -> None:
    rng = np.random.default_rng(7)
    label_map = rng.choice([BACKGROUND, SKIN, LESION], size=(37, 53), p=[0.05, 0.75, 0.2]).astype(
        np.uint8
    )
    crops = select_crops(
        label_map, window_fractions=[0.3, 0.5], stride_fraction=0.2, max_crops=1000, max_overlap=1.0
    )
    assert crops
    for crop in crops:
        r0, c0, r1, c1 = crop.analysis_box
        window = label_map[r0:r1, c0:c1]
        assert np.mean(window != BACKGROUND) == pytest.approx(crop.skin_fraction)
        assert np.mean(window == LESION) == pytest.approx(crop.lesion_fraction)
    # Brute force: every qualifying window on the grid is returned when overlap is unlimited.
    expected = 0
    for side in (round(0.3 * 37), round(0.5 * 37)):
        stride = max(1, round(0.2 * side))
        starts_r = sorted(set(range(0, 37 - side + 1, stride)) | {37 - side})
        starts_c = sorted(set(range(0, 53 - side + 1, stride)) | {53 - side})
        for r in starts_r:
            for c in starts_c:
                window = label_map[r : r + side, c : c + side]
                if np.mean(window != BACKGROUND) > 0.8 and np.mean(window == LESION) > 0.1:
                    expected += 1
    assert len(crops) == expected


def test_overlap_suppression_and_max_crops() -> None:
    label_map = np.full((100, 100), SKIN, dtype=np.uint8)
    label_map[::2, ::2] = LESION  # 25 % lesion everywhere: every window qualifies
    rule = {"window_fractions": [0.5], "stride_fraction": 0.1}
    everything = select_crops(label_map, max_overlap=1.0, max_crops=1000, **rule)
    assert len(everything) == 11 * 11
    separated = select_crops(label_map, max_overlap=0.0, max_crops=1000, **rule)
    assert len(separated) == 4  # four 50 x 50 tiles fit without touching
    boxes = [c.analysis_box for c in separated]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap_rows = min(a[2], b[2]) - max(a[0], b[0])
            overlap_cols = min(a[3], b[3]) - max(a[1], b[1])
            assert overlap_rows <= 0 or overlap_cols <= 0
    assert len(select_crops(label_map, max_overlap=1.0, max_crops=3, **rule)) == 3


def test_ranked_by_lesion_fraction() -> None:
    label_map = np.full((100, 200), SKIN, dtype=np.uint8)
    label_map[10:40, 10:40] = LESION  # 900 pixels
    label_map[60:80, 150:170] = LESION  # 400 pixels
    crops = select_crops(label_map, window_fractions=[0.5], stride_fraction=0.1, max_overlap=0.0)
    fractions = [c.lesion_fraction for c in crops]
    assert fractions == sorted(fractions, reverse=True)
    assert crops[0].analysis_box[1] < 100  # the larger lesion first


def test_boxes_map_to_full_resolution() -> None:
    label_map = np.full((100, 150), SKIN, dtype=np.uint8)
    label_map[40:60, 60:90] = LESION
    crops = select_crops(label_map, full_shape=(1000, 1500), window_fractions=[0.4])
    assert crops
    for crop in crops:
        r0, c0, r1, c1 = crop.analysis_box
        assert crop.box == (r0 * 10, c0 * 10, r1 * 10, c1 * 10)
    assert map_box((0, 0, 3, 3), (3, 3), (10, 10)) == (0, 0, 10, 10)


def test_no_skin_no_crop() -> None:
    assert select_crops(np.zeros((64, 64), dtype=np.uint8)) == []


@pytest.mark.parametrize(
    "label_map",
    [
        np.zeros((4, 4, 3), dtype=np.uint8),
        np.full((4, 4), 3, dtype=np.uint8),
        np.zeros((4, 4), dtype=np.float32),
        np.zeros((0, 4), dtype=np.uint8),
    ],
)
def test_bad_label_maps_are_refused(label_map: np.ndarray) -> None:
    with pytest.raises(CropError):
        select_crops(label_map)


def test_bad_parameters_are_refused() -> None:
    label_map = np.ones((10, 10), dtype=np.uint8)
    with pytest.raises(CropError):
        select_crops(label_map, window_fractions=[1.5])
    with pytest.raises(CropError):
        select_crops(label_map, stride_fraction=0)
    with pytest.raises(CropError):
        select_crops(label_map, max_crops=0)


def test_truth_crops_use_the_analysis_grid() -> None:
    full = np.full((1200, 1600), SKIN, dtype=np.uint8)
    full[500:700, 600:800] = LESION
    crops = select_truth_crops(full, long_side=160, window_fractions=[0.3], max_overlap=0.0)
    assert crops
    small_rows, small_cols = 120, 160
    for crop in crops:
        r0, c0, r1, c1 = crop.analysis_box
        assert r1 <= small_rows and c1 <= small_cols
        assert crop.box == (r0 * 10, c0 * 10, r1 * 10, c1 * 10)
        window = full[crop.box[0] : crop.box[2], crop.box[1] : crop.box[3]]
        assert np.mean(window == LESION) == pytest.approx(crop.lesion_fraction, abs=0.02)


def test_cut_crops_from_full_resolution() -> None:
    rgb = np.zeros((400, 600, 3), dtype=np.uint8)
    rgb[100:200, 300:400] = (200, 50, 25)
    crops = cut_crops(rgb, [(100, 300, 200, 400), (0, 0, 100, 100)], 32)
    assert crops.shape == (2, 32, 32, 3) and crops.dtype == np.uint8
    assert np.all(crops[0] == (200, 50, 25))
    assert np.all(crops[1] == 0)
    assert cut_crops(rgb, [], 32).shape == (0, 32, 32, 3)
    with pytest.raises(CropError):
        cut_crops(rgb, [(0, 0, 500, 10)], 32)
    whole = cut_whole_photo(rgb, 60)
    assert whole.shape == (1, 60, 60, 3)
    # The red square covers columns 300..400 of 600 -> 30..40 of 60, rows 100..200 of 400 -> 15..30.
    assert tuple(whole[0, 22, 35]) == (200, 50, 25)
