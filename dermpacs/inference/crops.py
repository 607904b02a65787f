"""The paper's crop rule: square windows with more than 80 % skin and more than 10 % lesion.

Yanagisawa et al. (J Dermatol Sci 2023) cut, from the segmented photo, windows in which skin
covers more than 80 % and lesion more than 10 %, and classify those instead of the whole photo.
Here:

- Windows are squares whose side is each of ``window_fractions`` times the short side of the
  label map, placed every ``stride_fraction`` of their side (plus a last position flush with the
  bottom and right edges, so that every pixel can be covered).
- Lesion pixels count as skin for the skin test: a lesion is skin that is affected, and a window
  filled by lesion is the best crop there is. Both tests are strict (``>``), as in the paper.
- Fractions come from integral images (summed-area tables): every window costs four lookups.
- Overlapping windows are suppressed greedily: windows are ranked by lesion fraction (then
  larger side, then skin fraction, then position, for a deterministic order) and a window is kept
  when its intersection over union with every kept one is at most ``max_overlap``; at most
  ``max_crops`` are kept.
- The rule runs on the low-resolution label map (the analysis scale); boxes are mapped back to
  the full-resolution photo, from which :func:`cut_crops` cuts and resizes them.

The same functions applied to a true mask give the "truth crops" of the paper's comparison
(:func:`select_truth_crops`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dermpacs.analysis import BACKGROUND, LESION, SKIN
from dermpacs.inference.preprocessing import analysis_shape, check_rgb, resize_label_map

Box = tuple[int, int, int, int]  # (row0, col0, row1, col1), exclusive ends


class CropError(ValueError):
    """A label map or a crop request the rule cannot work with."""


@dataclass(frozen=True)
class CropWindow:
    """A window that met the rule.

    ``box`` is in full-resolution photo pixels, ``analysis_box`` in the label map the rule ran
    on; both ``(row0, col0, row1, col1)`` with exclusive ends. The fractions are of the window,
    measured on that label map; lesion pixels count in ``skin_fraction``.
    """

    box: Box
    analysis_box: Box
    skin_fraction: float
    lesion_fraction: float


def _check_label_map(label_map: np.ndarray) -> np.ndarray:
    if not isinstance(label_map, np.ndarray) or label_map.ndim != 2:
        raise CropError("the label map must be a 2-D numpy array")
    if label_map.size == 0:
        raise CropError("the label map is empty")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise CropError(f"the label map must hold integer labels, got {label_map.dtype}")
    high, low = int(label_map.max()), int(label_map.min())
    if low < BACKGROUND or high > LESION:
        raise CropError(f"labels must be {BACKGROUND}, {SKIN} or {LESION}; found {low}..{high}")
    return label_map


def integral_image(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column: ``S[r, c] = mask[:r, :c].sum()``."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1, out=table[1:, 1:])
    return table


def _window_sums(table: np.ndarray, rows: np.ndarray, cols: np.ndarray, side: int) -> np.ndarray:
    """Sum inside every ``side`` square whose top-left corner is at (rows[i], cols[j])."""
    r0, c0 = np.ix_(rows, cols)
    r1, c1 = r0 + side, c0 + side
    return table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]


def _positions(length: int, side: int, stride: int) -> np.ndarray:
    starts = list(range(0, length - side + 1, stride))
    if starts[-1] != length - side:
        starts.append(length - side)
    return np.asarray(starts, dtype=np.int64)


def _iou(a: Box, b: Box) -> float:
    rows = min(a[2], b[2]) - max(a[0], b[0])
    cols = min(a[3], b[3]) - max(a[1], b[1])
    if rows <= 0 or cols <= 0:
        return 0.0
    intersection = rows * cols
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return intersection / (area_a + area_b - intersection)


def map_box(box: Box, from_shape: Sequence[int], to_shape: Sequence[int]) -> Box:
    """Scale a box from an image of ``from_shape`` to one of ``to_shape`` (rows, columns)."""
    sy = to_shape[0] / from_shape[0]
    sx = to_shape[1] / from_shape[1]
    r0 = min(max(round(box[0] * sy), 0), to_shape[0] - 1)
    c0 = min(max(round(box[1] * sx), 0), to_shape[1] - 1)
    r1 = min(max(round(box[2] * sy), r0 + 1), to_shape[0])
    c1 = min(max(round(box[3] * sx), c0 + 1), to_shape[1])
    return int(r0), int(c0), int(r1), int(c1)


def select_crops(
    label_map: np.ndarray,
    *,
    full_shape: Sequence[int] | None = None,
    min_skin_fraction: float = 0.80,
    min_lesion_fraction: float = 0.10,
    window_fractions: Sequence[float] = (0.2, 0.3, 0.45),
    stride_fraction: float = 0.25,
    max_crops: int = 8,
    max_overlap: float = 0.3,
) -> list[CropWindow]:
    """Windows of ``label_map`` that meet the rule, best first.

    Parameters
    ----------
    label_map
        Labels BACKGROUND, SKIN, LESION at the analysis scale.
    full_shape
        Rows and columns of the full-resolution photo the boxes are mapped to; by default the
        label map's own.
    min_skin_fraction, min_lesion_fraction
        A window qualifies when skin (lesion included) covers strictly more than the first and
        lesion strictly more than the second.
    window_fractions
        Window sides as fractions of the label map's short side (each in (0, 1]).
    stride_fraction
        Step between windows as a fraction of their side.
    max_crops
        At most this many windows are returned.
    max_overlap
        Largest intersection over union allowed between two returned windows.

    Returns
    -------
    list of CropWindow
        Ranked by lesion fraction, highest first; empty when no window qualifies.

    Raises
    ------
    CropError
        A label map that is not 2-D integer labels 0..2, or a parameter out of range.
    """
    label_map = _check_label_map(label_map)
    if not window_fractions or any(not 0 < f <= 1 for f in window_fractions):
        raise CropError(f"window_fractions must lie in (0, 1]: {window_fractions!r}")
    if not 0 < stride_fraction <= 1:
        raise CropError(f"stride_fraction must lie in (0, 1], got {stride_fraction}")
    if max_crops < 1:
        raise CropError(f"max_crops must be at least 1, got {max_crops}")
    rows, columns = label_map.shape
    full = (rows, columns) if full_shape is None else (int(full_shape[0]), int(full_shape[1]))

    skin_table = integral_image(label_map != BACKGROUND)  # lesion counts as skin
    lesion_table = integral_image(label_map == LESION)
    short_side = min(rows, columns)

    # (lesion fraction, side, skin fraction, row, col) of every qualifying window
    candidates: list[tuple[float, int, float, int, int]] = []
    for side in sorted({max(1, min(short_side, round(f * short_side))) for f in window_fractions}):
        stride = max(1, round(stride_fraction * side))
        starts_r = _positions(rows, side, stride)
        starts_c = _positions(columns, side, stride)
        area = side * side
        # count / area > threshold: the division is correctly rounded, so a window at exactly
        # the threshold (80 of 100 pixels against 0.8) compares equal and is refused.
        skin = _window_sums(skin_table, starts_r, starts_c, side) / area
        lesion = _window_sums(lesion_table, starts_r, starts_c, side) / area
        keep = (skin > min_skin_fraction) & (lesion > min_lesion_fraction)
        for i, j in zip(*np.nonzero(keep), strict=True):
            candidates.append(
                (float(lesion[i, j]), side, float(skin[i, j]), int(starts_r[i]), int(starts_c[j]))
            )

    candidates.sort(key=lambda c: (-c[0], -c[1], -c[2], c[3], c[4]))
    chosen: list[CropWindow] = []
    for lesion_fraction, side, skin_fraction, r, c in candidates:
        analysis_box = (r, c, r + side, c + side)
        if any(_iou(analysis_box, kept.analysis_box) > max_overlap for kept in chosen):
            continue
        chosen.append(
            CropWindow(
                box=map_box(analysis_box, (rows, columns), full),
                analysis_box=analysis_box,
                skin_fraction=skin_fraction,
                lesion_fraction=lesion_fraction,
            )
        )
        if len(chosen) == max_crops:
            break
    return chosen


def select_truth_crops(
    true_label_map: np.ndarray,
    *,
    long_side: int,
    min_skin_fraction: float = 0.80,
    min_lesion_fraction: float = 0.10,
    window_fractions: Sequence[float] = (0.2, 0.3, 0.45),
    stride_fraction: float = 0.25,
    max_crops: int = 8,
    max_overlap: float = 0.3,
) -> list[CropWindow]:
    """The rule applied to a true, full-resolution mask, as the pipeline applies it to its own.

    The mask is reduced (nearest neighbour) to the analysis scale the pipeline uses for
    ``long_side``, so that truth crops and CNN crops are chosen on the same grid and differ only
    by the mask they come from. Boxes are in the mask's full-resolution pixels.
    """
    true_label_map = _check_label_map(true_label_map)
    small = resize_label_map(true_label_map, analysis_shape(true_label_map.shape, long_side))
    return select_crops(
        small,
        full_shape=true_label_map.shape,
        min_skin_fraction=min_skin_fraction,
        min_lesion_fraction=min_lesion_fraction,
        window_fractions=window_fractions,
        stride_fraction=stride_fraction,
        max_crops=max_crops,
        max_overlap=max_overlap,
    )


def cut_crops(rgb_full: np.ndarray, boxes: Sequence[Box], size: int) -> np.ndarray:
    """Cut ``boxes`` from the full-resolution photo and resize each to ``size`` x ``size``.

    Returns
    -------
    numpy.ndarray
        ``(len(boxes), size, size, 3)`` uint8 (bilinear, antialiased when reducing).

    Raises
    ------
    CropError
        A box outside the photo or empty.
    """
    rgb_full = check_rgb(rgb_full)
    if size < 1:
        raise CropError(f"size must be at least 1, got {size}")
    out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    if not boxes:
        return out
    rows, columns = rgb_full.shape[:2]
    for index, (r0, c0, r1, c1) in enumerate(boxes):
        if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= columns):
            raise CropError(
                f"box {(r0, c0, r1, c1)} is empty or outside the photo {rows}x{columns}"
            )
        # Cut first, then resize: resampling inside the full image would let the filter reach
        # pixels outside the window.
        window = Image.fromarray(np.ascontiguousarray(rgb_full[r0:r1, c0:c1]))
        out[index] = np.asarray(
            window.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        )
    return out


def cut_whole_photo(rgb_full: np.ndarray, size: int) -> np.ndarray:
    """The whole photo resized to ``size`` x ``size`` (aspect not kept), shape ``(1, S, S, 3)``.

    This is the classifier's input when no window qualifies, and the "whole image" arm of the
    paper's comparison.
    """
    rgb_full = check_rgb(rgb_full)
    rows, columns = rgb_full.shape[:2]
    return cut_crops(rgb_full, [(0, 0, rows, columns)], size)
