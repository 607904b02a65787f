"""Synthetic clinical-like photographs with exact masks and labels.

The generator stands in for the non-standardized clinical photographs of the method (Yanagisawa
et al., J Dermatol Sci 2023;109(1):30-36): long shots of a body region (arm, leg, hand, trunk,
head and shoulders) in a room or outdoors, and close-ups where skin fills most of the frame.
Every photo shows one disease:

* atopic dermatitis: ill-defined erythematous patches with lichenified skin (a fine crosshatch of
  accentuated skin lines) and a few excoriations;
* mycosis fungoides: well-demarcated plaques of varied size, sometimes annular with central
  clearing, salmon or brownish (hypopigmented on dark skin), with fine scale;
* impetigo: honey-coloured crusts on sharply bordered red erosions, in small groups;
* herpesvirus infection: clusters of small domed vesicles and punched-out erosions on a red base.

Colours overlap between classes on purpose (all are reddish on some skin), so that a model has to
learn the morphology, not one global colour. Skin tone is drawn uniformly over the individual
typology angle (ITA°) from very light to dark and the skin colour is built in CIELAB.

The masks are exact: every drawn layer has a coverage (alpha) and a pixel is labelled by the
layer whose coverage is at least one half at the pixel centre. Lesion pixels are lesion-drawn
pixels on visible skin, skin pixels are the visible body surface, the rest is background. The
camera effects (lighting, blur, noise, JPEG) change the photo, not the labels.

Each photo is drawn with its own :class:`numpy.random.Generator` seeded from ``(seed, index)``,
so a set is the same whatever the order or the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from dermpacs.analysis import BACKGROUND, LESION, SKIN

# one definition of CIELAB and of the ITA categories, shared with the pipeline's skin tone
from dermpacs.inference.skintone import ita_category as ita_category
from dermpacs.inference.skintone import srgb_to_lab as srgb_to_lab

CLASSES: tuple[str, ...] = (
    "atopic_dermatitis",
    "mycosis_fungoides",
    "impetigo",
    "herpesvirus_infection",
)

#: Columns of ``labels.csv``, in order. ``image`` and ``label`` are the two a hospital's own set
#: must have; the others describe how a synthetic photo was made.
LABEL_COLUMNS: tuple[str, ...] = (
    "image",
    "label",
    "ita",
    "ita_category",
    "seed",
    "index",
    "width",
    "height",
    "scene",
    "body_region",
    "skin_l",
    "skin_a",
    "skin_b",
    "background",
    "px_per_cm",
    "n_lesions",
    "skin_fraction",
    "lesion_fraction",
    "illumination_gradient",
    "shadow",
    "white_balance",
    "exposure",
    "blur_sigma",
    "noise_sigma",
    "jpeg_quality",
)

ITA_RANGE = (-60.0, 72.0)
#: Body regions of a long shot, drawn uniformly (an arm twice as often; some arms end in a hand).
LONG_SHOT_REGIONS: tuple[str, ...] = ("arm", "arm", "leg", "trunk", "face")
#: The same with ``realistic``: heads and shoulders twice as often, and hands on their own.
REALISTIC_LONG_SHOT_REGIONS: tuple[str, ...] = (
    "arm",
    "arm",
    "leg",
    "trunk",
    "face",
    "face",
    "hand",
)
#: With ``realistic``, the share of long shots whose background is a negative scene (sky,
#: leaves, fur, wood, cloth, a table with objects) rather than a room.
OUTDOOR_SHARE = 0.35
#: Least share of the frame a photo's lesions cover (of a quarter of it for small skin areas).
MIN_LESION_FRACTION = 0.015


class SynthError(ValueError):
    """A synthetic set cannot be generated with the arguments given."""


# --------------------------------------------------------------------------- colour
_D65 = np.array([0.95047, 1.0, 1.08883])
_XYZ_TO_RGB = np.array(
    [
        [3.2404542, -1.5371385, -0.4985314],
        [-0.9692660, 1.8760108, 0.0415560],
        [0.0556434, -0.2040259, 1.0572252],
    ]
)


def lab_to_srgb(lab: np.ndarray | Sequence[float]) -> np.ndarray:
    """Convert CIELAB (D65) to sRGB in [0, 1]; the last axis holds L*, a*, b*."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    fx = fy + lab[..., 1] / 500.0
    fz = fy - lab[..., 2] / 200.0
    f = np.stack([fx, fy, fz], axis=-1)
    xyz = np.where(f > 6.0 / 29.0, f**3, 3 * (6.0 / 29.0) ** 2 * (f - 4.0 / 29.0)) * _D65
    linear = np.clip(xyz @ _XYZ_TO_RGB.T, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.clip(srgb, 0.0, 1.0)


def _rgb(lab: np.ndarray | Sequence[float]) -> np.ndarray:
    return lab_to_srgb(lab).astype(np.float32)


# --------------------------------------------------------------------------- fields
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Band-limited noise with unit spread: random values on a grid of ``cell`` px, upsampled."""
    gh = max(2, math.ceil(h / cell) + 1)
    gw = max(2, math.ceil(w / cell) + 1)
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    field = np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    # the spread of a sparse sample is close enough and costs a sixteenth
    spread = float(field[::4, ::4].std())
    return field * (1.0 / spread) if spread > 1e-6 else field


def _fine_grain(rng: np.random.Generator, h: int, w: int, cell: float, amount: float) -> np.ndarray:
    """``1 + amount * noise`` with features of about ``cell`` px, from uniform random bytes.

    Drawing normal deviates for a near-full-resolution grid dominates the cost of a photo;
    interpolated uniform bytes look the same at this scale.
    """
    gh, gw = math.ceil(h / cell) + 1, math.ceil(w / cell) + 1
    grid = np.frombuffer(rng.bytes(gh * gw), np.uint8).reshape(gh, gw).astype(np.float32)
    # uniform bytes spread 73.9 levels; bicubic interpolation keeps about 0.8 of the spread
    gain = amount / (73.9 * 0.815)
    grid *= gain
    grid += 1.0 - 127.5 * gain
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def _fractal_noise(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3):
    total = np.zeros((h, w), np.float32)
    amplitude, norm = 1.0, 0.0
    for _ in range(octaves):
        total += amplitude * _smooth_noise(rng, h, w, max(cell, 2.0))
        norm += amplitude
        amplitude *= 0.5
        cell /= 2.0
    return total / norm


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates as broadcasting (h, 1) and (1, w) arrays."""
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    return yy, xx


def _coverage(signed_inside: np.ndarray, ramp: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in px (positive inside)."""
    return np.clip(signed_inside / max(ramp, 1e-3) + 0.5, 0.0, 1.0).astype(np.float32)


Box = tuple[slice, slice]


def _bbox(alpha: np.ndarray) -> Box | None:
    """The smallest rectangle holding every non-zero value of ``alpha``, or None."""
    rows = np.flatnonzero(alpha.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(alpha.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _blend(
    image: np.ndarray, alpha: np.ndarray, colour: np.ndarray, box: Box | None = None
) -> None:
    """Blend ``colour`` into ``image`` in place with coverage ``alpha``.

    ``colour`` is one RGB value (3,), an image of ``image``'s size, or an image of ``box``'s
    size; only the rectangle where ``alpha`` is non-zero is touched.
    """
    full = colour.ndim == 3 and colour.shape[:2] == image.shape[:2]
    if box is None:
        box = _bbox(alpha)
        if box is None:
            return
    elif not full and colour.ndim == 3 and colour.shape[:2] != alpha[box].shape:
        raise ValueError("colour layer does not match the box")
    region = image[box]
    if full:
        colour = colour[box]
    region += alpha[box][..., None] * (colour - region)


def _stroke_mask(h: int, w: int, draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    draw(ImageDraw.Draw(canvas))
    return np.asarray(canvas, dtype=np.float32) / 255.0


@dataclass
class _Window:
    """A rectangle of the frame in which a local feature is drawn."""

    rows: slice
    cols: slice
    yy: np.ndarray
    xx: np.ndarray


def _window(cy: float, cx: float, radius: float, h: int, w: int) -> _Window | None:
    r0, r1 = max(0, int(cy - radius) - 1), min(h, int(cy + radius) + 2)
    c0, c1 = max(0, int(cx - radius) - 1), min(w, int(cx + radius) + 2)
    if r0 >= r1 or c0 >= c1:
        return None
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    return _Window(slice(r0, r1), slice(c0, c1), yy - cy, xx - cx)


# --------------------------------------------------------------------------- background
# Lab colours of walls, furniture and fabrics; the first group is deliberately skin-like.
_SKIN_LIKE = [(78, 6, 18), (70, 10, 24), (62, 12, 28), (52, 14, 30), (40, 14, 24), (83, 4, 12)]
_NEUTRAL = [(92, 0, 2), (85, -1, -3), (70, 0, 0), (55, -2, -6), (30, 0, -2), (15, 1, 1)]
_VIVID = [(55, -30, 20), (45, 10, -45), (35, 5, -35), (50, 55, 35), (70, -15, -10), (60, 30, -20)]


def _palette_colour(rng: np.random.Generator, skin_like_bias: float = 0.35) -> tuple[str, tuple]:
    """A wall, object or fabric colour: skin-like, warm (orange, red, pink), neutral or vivid."""
    u = rng.random()
    if u < skin_like_bias:
        kind, base = "skin_like", _SKIN_LIKE[rng.integers(len(_SKIN_LIKE))]
    elif u < skin_like_bias + (1 - skin_like_bias) * 0.3:
        kind, base = "warm", _WARM[rng.integers(len(_WARM))]
    elif u < skin_like_bias + (1 - skin_like_bias) * 0.7:
        kind, base = "neutral", _NEUTRAL[rng.integers(len(_NEUTRAL))]
    else:
        kind, base = "vivid", _VIVID[rng.integers(len(_VIVID))]
    jitter = rng.normal(0.0, (4.0, 3.0, 4.0))
    return kind, tuple(float(v) for v in np.asarray(base) + jitter)


def _texture(rng: np.random.Generator, h: int, w: int, kind: str) -> np.ndarray:
    """A luminance texture around 1 for plaster, wood grain, fabric weave, stripes or checks."""
    yy, xx = _grid(h, w)
    if kind == "wood":
        angle = rng.uniform(0, math.pi)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        warp = 6.0 * _smooth_noise(rng, h, w, rng.uniform(40, 120))
        grain = np.sin((u + warp) * (2 * math.pi / rng.uniform(5, 14)))
        return 1.0 + 0.10 * grain + 0.04 * _smooth_noise(rng, h, w, 3)
    if kind == "weave":
        period = rng.uniform(2.5, 5)
        return 1.0 + 0.07 * np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period)
    if kind == "stripes":
        angle = rng.uniform(0, math.pi)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        return np.where(
            np.sin(u * 2 * math.pi / rng.uniform(8, 30)) > 0, 1.0, rng.uniform(0.5, 0.8)
        )
    if kind == "checks":
        period = rng.uniform(10, 40)
        a = np.sin(xx * 2 * math.pi / period) > 0
        b = np.sin(yy * 2 * math.pi / period) > 0
        return np.where(a ^ b, 1.0, rng.uniform(0.55, 0.85))
    if kind == "dots":
        period = rng.uniform(10, 24)
        dy = (yy % period) - period / 2
        dx = (xx % period) - period / 2
        return np.where(dy * dy + dx * dx < (period * 0.22) ** 2, rng.uniform(0.4, 0.7), 1.0)
    return 1.0 + 0.03 * _fractal_noise(rng, h, w, 6, 2)  # plaster, plain fabric


def _textured_layer(
    rng: np.random.Generator, h: int, w: int, lab: Sequence[float] | np.ndarray, texture: str
) -> np.ndarray:
    tex = _texture(rng, h, w, texture).astype(np.float32)
    return _rgb(lab)[None, None, :] * tex[..., None]


def _background(rng: np.random.Generator, h: int, w: int, params: dict[str, Any]) -> np.ndarray:
    """A room: a wall, furniture or doors, a sheet, a picture; some of it skin-coloured."""
    kind, wall_lab = _palette_colour(rng, skin_like_bias=0.4)
    wall_texture = rng.choice(["plaster", "plaster", "wood", "stripes", "weave"])
    image = _textured_layer(rng, h, w, wall_lab, str(wall_texture))
    image *= (1.0 + 0.08 * _smooth_noise(rng, h, w, max(h, w) / 2))[..., None]
    params["background"] = f"{kind}_{wall_texture}"
    for _ in range(int(rng.integers(0, 4))):
        _, obj_lab = _palette_colour(rng, skin_like_bias=0.5)
        texture = str(rng.choice(["wood", "plaster", "weave", "stripes", "checks"]))
        y0, x0 = rng.uniform(-0.2, 0.9) * h, rng.uniform(-0.2, 0.9) * w
        y1, x1 = y0 + rng.uniform(0.15, 0.8) * h, x0 + rng.uniform(0.1, 0.7) * w
        rows = slice(max(0, int(y0)), min(h, int(math.ceil(y1)) + 1))
        cols = slice(max(0, int(x0)), min(w, int(math.ceil(x1)) + 1))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            continue
        yy = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None]
        xx = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :]
        alpha = _coverage(np.minimum(np.minimum(yy - y0, y1 - yy), np.minimum(xx - x0, x1 - xx)))
        layer = _textured_layer(rng, alpha.shape[0], alpha.shape[1], obj_lab, texture)
        # a bevel: objects are lit from one side
        layer *= (1.0 + 0.1 * np.tanh((xx - x0) / 20.0 - 1.0))[..., None]
        region = image[rows, cols]
        region += alpha[..., None] * (layer - region)
    # things in the room that are not skin but look like it: cups, food, flowers, pets, cloths
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 4))):
            _object(rng, image, str(rng.choice(_OBJECT_KINDS)))
    return image


# --------------------------------------------------------------------------- negatives
# Photos and backgrounds with things that are not skin but share its colours or its smooth
# shading: without them a network learns "warm and softly shaded" as skin and takes fur, petals,
# food, wood, warm fabrics and skies for it (docs/model-card.md, real photographs).
#: ``label`` of a photo without any skin (a negative): only segmentation trains on it.
NEGATIVE_LABEL = "none"
#: Scenes of a negative photo.
NEGATIVE_SCENES: tuple[str, ...] = ("sky", "foliage", "fur", "wood", "fabric", "table", "room")

# Lab colours of warm fabrics, paint and objects: orange, red, crimson, salmon, pink, rust,
# amber, beige, terracotta, mauve.
_WARM = [
    (62, 45, 62),
    (50, 62, 45),
    (40, 55, 28),
    (70, 35, 25),
    (78, 22, 6),
    (48, 35, 45),
    (72, 18, 62),
    (82, 6, 24),
    (55, 30, 35),
    (60, 28, 0),
]
_FUR = [(55, 18, 40), (38, 12, 22), (25, 5, 10), (80, 3, 14), (60, 2, 6), (12, 1, 2), (68, 10, 30)]
_FOLIAGE = [(45, -25, 35), (35, -20, 25), (55, -30, 45), (30, -10, 18), (62, -15, 55)]
_AUTUMN = [(60, 25, 60), (50, 40, 45), (70, 5, 65), (40, 25, 30), (45, 50, 35)]
_FOOD = [(55, 20, 45), (65, 30, 65), (45, 55, 40), (28, 10, 18), (75, 5, 40), (60, 40, 50)]


def _jitter(rng: np.random.Generator, base: Sequence[float], spread: float = 1.0) -> np.ndarray:
    return np.asarray(base, np.float64) + rng.normal(
        0.0, (4.0 * spread, 4.0 * spread, 5.0 * spread)
    )


def _pick(rng: np.random.Generator, palette: Sequence[tuple[float, ...]], spread: float = 1.0):
    return _jitter(rng, palette[int(rng.integers(len(palette)))], spread)


def _ellipse(
    rng: np.random.Generator, h: int, w: int, cy: float, cx: float, ry: float, rx: float
) -> tuple[_Window, np.ndarray, np.ndarray] | None:
    """A rotated ellipse's window, its coverage there and the normalised radius (0 centre)."""
    win = _window(cy, cx, max(ry, rx) + 2, h, w)
    if win is None:
        return None
    angle = rng.uniform(0, math.pi)
    c, s = math.cos(angle), math.sin(angle)
    u = win.xx * c + win.yy * s
    v = -win.xx * s + win.yy * c
    r = np.hypot(u / max(rx, 1.0), v / max(ry, 1.0))
    return win, _coverage((1.0 - r) * min(rx, ry)), r


def _fur_layer(rng: np.random.Generator, h: int, w: int, lab: Sequence[float]) -> np.ndarray:
    """An animal's coat: fine strands along a slowly turning direction, sometimes tabby bands."""
    yy, xx = _grid(h, w)
    angle = rng.uniform(0, 2 * math.pi)
    warp = 0.6 * _smooth_noise(rng, h, w, rng.uniform(60, 160))
    c, s = np.cos(angle + warp), np.sin(angle + warp)
    u = xx * c + yy * s  # along the strands
    v = -xx * s + yy * c  # across
    strand_len, strand_w = rng.uniform(6, 16), rng.uniform(0.8, 1.8)
    span = float(math.hypot(h, w)) + 2
    grid = rng.standard_normal(
        (int(2 * span / strand_w) + 4, int(2 * span / strand_len) + 4)
    ).astype(np.float32)
    strands = ndimage.map_coordinates(
        grid, [(v + span) / strand_w, (u + span) / strand_len], order=1, mode="wrap"
    )
    tex = 1.0 + rng.uniform(0.12, 0.25) * strands
    tex *= 1.0 + 0.12 * _smooth_noise(rng, h, w, rng.uniform(20, 50))
    if rng.random() < 0.4:  # tabby stripes across the strands
        bands = np.sin((v + 8.0 * _smooth_noise(rng, h, w, 40)) * 2 * math.pi / rng.uniform(14, 40))
        tex *= np.where(bands > 0.3, rng.uniform(0.45, 0.7), 1.0)
    return _rgb(lab)[None, None, :] * tex[..., None].astype(np.float32)


def _sky_layer(rng: np.random.Generator, h: int, w: int, params: dict[str, Any]) -> np.ndarray:
    """Sky with clouds: day, overcast, sunset or night; sometimes a horizon of land or sea."""
    kind = str(rng.choice(["day", "day", "overcast", "sunset", "night"]))
    yy, _ = _grid(h, w)
    t = (yy / h).astype(np.float32)[..., None]
    tops = {
        "day": (45, 0, -45),
        "overcast": (75, -1, -6),
        "sunset": (45, 25, -25),
        "night": (8, 2, -12),
    }
    bottoms = {
        "day": (78, -6, -18),
        "overcast": (85, 0, -3),
        "sunset": (70, 30, 60),
        "night": (20, 3, -15),
    }
    top = _rgb(_jitter(rng, tops[kind]))
    bottom = _rgb(_jitter(rng, bottoms[kind]))
    image = top + t * (bottom - top)
    cover = rng.uniform(0.1, 0.9)
    clouds = _fractal_noise(rng, h, w, rng.uniform(40, 140), 4)
    density = np.clip((clouds - (1.0 - 2 * cover)) / 0.8, 0, 1)[..., None]
    cloud_lab = {
        "day": (95, 0, 2),
        "overcast": (70, 0, -3),
        "sunset": (75, 25, 40),
        "night": (25, 2, -5),
    }
    cloud = _rgb(_jitter(rng, cloud_lab[kind])) * (
        0.85 + 0.15 * _smooth_noise(rng, h, w, 25)[..., None]
    )
    image = image + density * (cloud - image)
    if kind == "night":  # stars
        stars = np.frombuffer(rng.bytes(h * w), np.uint8).reshape(h, w) > 252
        image[stars] = 0.9
    if rng.random() < 0.6:  # a horizon: hills, trees, sea or roofs
        line = h * rng.uniform(0.55, 0.9) + h * 0.05 * _smooth_noise(
            rng, h, w, rng.uniform(30, 120)
        )
        ground_kind = str(rng.choice(["foliage", "sea", "roofs"]))
        if ground_kind == "foliage":
            ground = _textured_layer(rng, h, w, _pick(rng, _FOLIAGE + _AUTUMN), "plaster")
            ground *= (1.0 + 0.25 * _fractal_noise(rng, h, w, 6, 3))[..., None]
        elif ground_kind == "sea":
            ground = _textured_layer(rng, h, w, _jitter(rng, (40, -5, -25)), "stripes")
        else:
            _, lab = _palette_colour(rng, 0.3)
            ground = _textured_layer(rng, h, w, lab, "checks")
        _blend(image, _coverage(yy - line), ground)
        params["negative_detail"] = f"{kind}_{ground_kind}"
    else:
        params["negative_detail"] = kind
    return image.astype(np.float32)


def _foliage_layer(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Leaves, green or autumn-coloured, overlapping on dark undergrowth."""
    image = _textured_layer(rng, h, w, _jitter(rng, (22, -10, 12)), "plaster")
    autumn = rng.random() < 0.4
    size = rng.uniform(0.03, 0.08) * max(h, w)
    for _ in range(int(rng.integers(40, 110))):
        lab = _pick(rng, _AUTUMN if autumn and rng.random() < 0.7 else _FOLIAGE)
        shape = _ellipse(
            rng,
            h,
            w,
            rng.uniform(0, h),
            rng.uniform(0, w),
            size * rng.uniform(0.6, 1.3),
            size * rng.uniform(0.25, 0.5),
        )
        if shape is None:
            continue
        win, alpha, r = shape
        colour = _rgb(lab)[None, None, :] * (1.1 - 0.3 * np.clip(r, 0, 1))[..., None]
        _blend(image[win.rows, win.cols], alpha, colour)
    return image


def _object(rng: np.random.Generator, image: np.ndarray, kind: str) -> None:
    """Draw one object that is not skin into ``image`` (float RGB) in place."""
    h, w, _ = image.shape
    scale = max(h, w) * rng.uniform(0.06, 0.22)
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    if kind == "cup":
        # a cylinder with a shaded body, an elliptical rim, coffee or tea inside and a handle
        lab = _pick(rng, _WARM + _NEUTRAL[:3] + _SKIN_LIKE)
        half_w, body_h = scale * 0.5, scale * rng.uniform(0.7, 1.3)
        win = _window(cy, cx, max(half_w * 1.6, body_h) + 4, h, w)
        if win is None:
            return
        rim_ry = half_w * rng.uniform(0.2, 0.4)
        top = -body_h / 2
        body = np.minimum(half_w - np.abs(win.xx), np.minimum(win.yy - top, body_h / 2 - win.yy))
        bottom_r = np.hypot(win.xx / half_w, (win.yy - body_h / 2) / rim_ry)
        body = np.maximum(body, (1.0 - bottom_r) * rim_ry)
        handle_r = np.hypot((win.xx - half_w) / (half_w * 0.45), win.yy / (body_h * 0.3))
        handle = np.minimum(1.0 - handle_r, handle_r - 0.6) * half_w * 0.3
        alpha = np.maximum(_coverage(body), _coverage(handle))
        shade = _cylinder_shade(np.clip(np.abs(win.xx + half_w * 0.3) / half_w, 0, 1), 0.5)
        layer = _rgb(lab)[None, None, :] * shade[..., None]
        region = image[win.rows, win.cols]
        _blend(region, alpha, layer)
        rim_r = np.hypot(win.xx / half_w, (win.yy - top) / rim_ry)
        _blend(region, _coverage((1.0 - rim_r) * rim_ry), _rgb((88, 0, 4)))
        drink = _rgb(_pick(rng, [(25, 12, 22), (40, 18, 40), (60, 10, 35)]))
        _blend(region, _coverage((0.85 - rim_r) * rim_ry), drink)
    elif kind in ("fruit", "food"):
        # round food with radial shading and a highlight: oranges, tomatoes, bread, pastry
        for _ in range(int(rng.integers(1, 6))):
            shape = _ellipse(
                rng,
                h,
                w,
                cy + rng.normal(0, scale * 0.6),
                cx + rng.normal(0, scale * 0.6),
                scale * rng.uniform(0.3, 0.6),
                scale * rng.uniform(0.3, 0.7),
            )
            if shape is None:
                continue
            win, alpha, r = shape
            tex = _fine_grain(rng, r.shape[0], r.shape[1], rng.uniform(1.5, 4), 0.12)
            colour = (
                _rgb(_pick(rng, _FOOD)) * (tex * (1.1 - 0.45 * np.clip(r, 0, 1) ** 2))[..., None]
            )
            region = image[win.rows, win.cols]
            _blend(region, alpha, colour)
            highlight = _coverage(
                (0.25 - np.hypot(win.xx + scale * 0.12, win.yy + scale * 0.12) / scale) * 8
            )
            _blend(region, highlight * alpha * 0.6, np.array([1.0, 0.97, 0.9], np.float32))
    elif kind == "flower":
        # petals around a disk: dahlias, roses, gerberas in warm or bright colours
        petal_lab = _pick(rng, _WARM + [(60, 60, -10), (85, 0, 70), (55, 45, -30), (92, 0, 5)])
        petals = int(rng.integers(5, 16))
        radius = scale * 0.6
        win = _window(cy, cx, radius * 1.1 + 3, h, w)
        if win is None:
            return
        theta = np.arctan2(win.yy, win.xx) + rng.uniform(0, math.pi)
        r = np.hypot(win.xx, win.yy) / radius
        edge = 0.55 + 0.45 * np.abs(np.cos(theta * petals / 2))
        alpha = _coverage((edge - r) * radius)
        vein = 1.0 - 0.25 * r * (1 - np.abs(np.cos(theta * petals / 2)))
        region = image[win.rows, win.cols]
        _blend(region, alpha, _rgb(petal_lab)[None, None, :] * vein[..., None])
        disk = _pick(rng, [(60, 5, 60), (30, 10, 25), (75, -5, 70)])
        _blend(region, _coverage((0.2 - r) * radius), _rgb(disk))
    elif kind == "animal":
        # a resting animal seen from above or the side: a furred body and head with ears
        lab = _pick(rng, _FUR)
        win = _window(cy, cx, scale * 1.6 + 4, h, w)
        if win is None:
            return
        body = (1.0 - np.hypot(win.xx / (scale * 1.1), win.yy / (scale * 0.7))) * scale * 0.7
        hx, hy = scale * rng.choice([-1.0, 1.0]) * 1.0, -scale * 0.45
        head = (
            (1.0 - np.hypot((win.xx - hx) / (scale * 0.45), (win.yy - hy) / (scale * 0.4)))
            * scale
            * 0.4
        )
        ears = np.full(win.yy.shape, -np.inf, np.float32)
        for side in (-1, 1):
            ex, ey = hx + side * scale * 0.25, hy - scale * 0.38
            ears = np.maximum(
                ears, (scale * 0.16 - np.abs(win.xx - ex) - 0.5 * np.abs(win.yy - ey))
            )
        alpha = _coverage(np.maximum(np.maximum(body, head), ears))
        hh, ww = win.yy.shape
        layer = (
            _fur_layer(rng, hh, ww, lab)
            * _cylinder_shade(
                np.clip(np.hypot(win.xx / (scale * 1.2), win.yy / (scale * 0.9)), 0, 1), 0.35
            )[..., None]
        )
        region = image[win.rows, win.cols]
        _blend(region, alpha, layer)
        for side in (-1, 1):  # eyes
            er = np.hypot(win.xx - hx - side * scale * 0.16, win.yy - hy + scale * 0.05)
            _blend(
                region, _coverage(scale * 0.06 - er), _rgb(_pick(rng, [(55, -5, 50), (20, 0, 5)]))
            )
    else:  # "fabric": a draped cloth in a warm colour with folds
        lab = _pick(rng, _WARM)
        shape = _ellipse(
            rng, h, w, cy, cx, scale * rng.uniform(0.8, 1.8), scale * rng.uniform(0.8, 1.8)
        )
        if shape is None:
            return
        win, alpha, _r = shape
        hh, ww = alpha.shape
        texture = str(rng.choice(["plain", "weave", "stripes", "checks"]))
        layer = _textured_layer(rng, hh, ww, lab, texture)
        layer *= (1.0 + 0.2 * _smooth_noise(rng, hh, ww, rng.uniform(10, 40)))[..., None]
        _blend(image[win.rows, win.cols], alpha, layer)


_OBJECT_KINDS: tuple[str, ...] = ("cup", "fruit", "food", "flower", "animal", "fabric")


def _negative_scene(rng: np.random.Generator, h: int, w: int, params: dict[str, Any]) -> np.ndarray:
    """A photo without skin: sky, leaves, an animal's coat, wood, cloth, a table or a room,
    with objects (cups, food, flowers, animals, cloths) in front."""
    scene = str(rng.choice(NEGATIVE_SCENES))
    params["background"] = scene
    if scene == "sky":
        image = _sky_layer(rng, h, w, params)
    elif scene == "foliage":
        image = _foliage_layer(rng, h, w)
    elif scene == "fur":
        image = _fur_layer(rng, h, w, _pick(rng, _FUR))
        image *= (1.0 + 0.15 * _smooth_noise(rng, h, w, max(h, w) / 3))[..., None]
    elif scene == "wood":
        lab = _pick(rng, _SKIN_LIKE + [(45, 15, 35), (30, 10, 20), (60, 12, 40)])
        image = _textured_layer(rng, h, w, lab, "wood")
        planks = rng.integers(2, 7)
        yy, xx = _grid(h, w)
        plank = np.floor(xx / (w / planks)) if rng.random() < 0.5 else np.floor(yy / (h / planks))
        image *= (0.85 + 0.3 * np.sin(plank * 12.9898) ** 2)[..., None].astype(np.float32)
    elif scene == "fabric":
        image = _textured_layer(
            rng, h, w, _pick(rng, _WARM), str(rng.choice(["plain", "weave", "stripes", "checks"]))
        )
        image *= (1.0 + 0.25 * _smooth_noise(rng, h, w, rng.uniform(25, 80)))[..., None]
    elif scene == "table":
        lab = _pick(rng, _SKIN_LIKE + _WARM + _NEUTRAL[:2])
        image = _textured_layer(rng, h, w, lab, str(rng.choice(["wood", "weave", "checks"])))
    else:
        image = _background(rng, h, w, {})
    objects = int(rng.integers(0, 3)) if scene in ("sky", "foliage") else int(rng.integers(1, 6))
    kinds = ["flower"] if scene == "foliage" else list(_OBJECT_KINDS)
    for _ in range(objects):
        _object(rng, image, str(rng.choice(kinds)))
    params["n_objects"] = objects
    return image


# --------------------------------------------------------------------------- body regions
@dataclass
class _Body:
    """Geometry of the photographed body surface and of what covers it."""

    coverage: np.ndarray  # skin surface (h, w) in [0, 1]
    shade: np.ndarray  # relief shading (h, w), about 0.55..1.05
    overlays: list[_Overlay]  # drawn over the skin, in order
    region: str
    # skin that is redder than the rest without being a lesion (cheeks, lips), 0..1
    flush: np.ndarray | None = None
    # specular highlights of oily or moist skin (forehead, nose, cheekbones), 0..1
    gloss: np.ndarray | None = None


@dataclass
class _Overlay:
    """Something that hides skin: hair, eyes, clothing, a ruler.

    ``layer`` is the RGB image of ``box`` (the rectangle where ``alpha`` is non-zero).
    """

    alpha: np.ndarray
    layer: np.ndarray
    box: Box


def _overlay(
    alpha: np.ndarray, make_layer: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> list[_Overlay]:
    """An overlay whose layer is made only for the rectangle it covers (none when empty).

    ``make_layer`` gets the rectangle's row and column coordinates as (n, 1) and (1, m) arrays.
    """
    box = _bbox(alpha)
    if box is None:
        return []
    yy = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None]
    xx = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :]
    layer = np.broadcast_to(make_layer(yy, xx), (yy.shape[0], xx.shape[1], 3))
    return [_Overlay(alpha, layer.astype(np.float32), box)]


def _fabric_overlay(rng: np.random.Generator, alpha: np.ndarray) -> list[_Overlay]:
    return _overlay(alpha, lambda yy, xx: _fabric(rng, yy.shape[0], xx.shape[1]))


def _limb_distance(
    yy: np.ndarray, xx: np.ndarray, points: np.ndarray, widths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distance to a polyline, normalised by its local half-width, and the arc position."""
    ratio = np.full(yy.shape, np.inf, np.float32)
    along = np.zeros(yy.shape, np.float32)
    lengths = np.linalg.norm(np.diff(points, axis=0), axis=1)
    start = 0.0
    for i in range(len(points) - 1):
        (y0, x0), (y1, x1) = points[i], points[i + 1]
        dy, dx = y1 - y0, x1 - x0
        length2 = max(dy * dy + dx * dx, 1e-6)
        u = np.clip(((yy - y0) * dy + (xx - x0) * dx) / length2, 0.0, 1.0)
        dist = np.hypot(yy - (y0 + u * dy), xx - (x0 + u * dx))
        width = widths[i] + u * (widths[i + 1] - widths[i])
        r = dist / width
        better = r < ratio
        ratio = np.where(better, r, ratio)
        along = np.where(better, start + u * lengths[i], along)
        start += lengths[i]
    return ratio, along


def _cylinder_shade(ratio: np.ndarray, strength: float) -> np.ndarray:
    depth = np.sqrt(np.clip(1.0 - np.minimum(ratio, 1.0) ** 2, 0.0, 1.0))
    return (1.0 - strength + strength * depth).astype(np.float32)


def _fabric(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    _, lab = _palette_colour(rng, skin_like_bias=0.25)
    texture = str(rng.choice(["plain", "weave", "stripes", "checks", "dots"]))
    layer = _textured_layer(rng, h, w, lab, texture)
    # folds
    return layer * (1.0 + 0.12 * _smooth_noise(rng, h, w, rng.uniform(20, 60)))[..., None]


def _upsample(field: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a field computed on the half-resolution grid of :func:`_half_grid`."""
    image = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    return np.asarray(image.resize((w, h), Image.Resampling.BILINEAR))


def _half_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of the centres of 2 x 2 pixel blocks, as (h/2, 1) and (1, w/2) arrays."""
    yy = np.arange(math.ceil(h / 2), dtype=np.float32)[:, None] * (h / math.ceil(h / 2))
    xx = np.arange(math.ceil(w / 2), dtype=np.float32)[None, :] * (w / math.ceil(w / 2))
    return yy + (h / math.ceil(h / 2) - 1) / 2, xx + (w / math.ceil(w / 2) - 1) / 2


def _limb(rng: np.random.Generator, h: int, w: int, region: str) -> _Body:
    """An arm or a leg crossing the frame, with a sleeve or a hem, an arm sometimes a hand.

    The distance fields are smooth, so they are computed on a half-resolution grid and
    interpolated; the coverage (and so the mask) is defined by the interpolated field.
    """
    short = min(h, w)
    yy, xx = _half_grid(h, w)
    # enter from one edge, leave through (or end near) another
    angle = rng.uniform(0, 2 * math.pi)
    centre = np.array([h / 2, w / 2]) + rng.normal(0, 0.08, 2) * (h, w)
    direction = np.array([math.sin(angle), math.cos(angle)])
    span = 0.75 * math.hypot(h, w)
    with_hand = region == "arm" and rng.random() < 0.4
    n = 4
    ts = np.linspace(-span, span * (0.25 if with_hand else 1.0), n)
    normal = np.array([-direction[1], direction[0]])
    bend = rng.normal(0, 0.08 * short, n)
    points = centre + ts[:, None] * direction + bend[:, None] * normal
    half = rng.uniform(0.17, 0.3) * short * (1.15 if region == "leg" else 1.0)
    widths = np.linspace(half * rng.uniform(1.0, 1.2), half * rng.uniform(0.75, 0.95), n)
    ratio, along = _limb_distance(yy, xx, points, widths)
    inside = (1.0 - ratio) * widths.mean()
    if with_hand:
        tip = points[-1]
        palm_r = widths[-1] * 1.15
        pd = np.hypot(
            yy - tip[0] - direction[0] * palm_r * 0.7, xx - tip[1] - direction[1] * palm_r * 0.7
        )
        inside = np.maximum(inside, palm_r - pd)
        finger_w = palm_r * 0.22
        for k, offset in enumerate(np.linspace(-0.75, 0.75, 4)):
            base = tip + direction * palm_r * 1.3 + normal * offset * palm_r
            length = palm_r * (1.1 + 0.3 * (1 - abs(offset))) * rng.uniform(0.9, 1.1)
            spread = direction + normal * offset * 0.25
            spread /= np.linalg.norm(spread)
            fpts = np.stack([base, base + spread * length])
            fr, _ = _limb_distance(yy, xx, fpts, np.array([finger_w, finger_w * 0.85]))
            inside = np.maximum(inside, (1.0 - fr) * finger_w)
            if k == 0:
                thumb = tip + direction * palm_r * 0.4 - normal * palm_r * 0.9
                tpts = np.stack([thumb, thumb + (direction - normal) * palm_r * 0.55])
                tr, _ = _limb_distance(yy, xx, tpts, np.array([finger_w * 1.2, finger_w]))
                inside = np.maximum(inside, (1.0 - tr) * finger_w * 1.2)
        region = "hand"
    inside, ratio, along = (_upsample(f, h, w) for f in (inside, ratio, along))
    coverage = _coverage(inside)
    shade = _cylinder_shade(ratio, rng.uniform(0.25, 0.45))
    overlays: list[_Overlay] = []
    if rng.random() < 0.75:
        # a sleeve (or trouser hem) over the part of the limb nearest the entry edge
        cut = rng.uniform(0.15, 0.55) * span
        edge = cut + 4.0 * _smooth_noise(rng, h, w, 25)
        sleeve = np.minimum((edge - along), (1.25 - ratio) * widths.mean())
        overlays += _fabric_overlay(rng, _coverage(sleeve))
    return _Body(coverage, shade, overlays, region)


def _trunk(rng: np.random.Generator, h: int, w: int) -> _Body:
    """A back, chest or abdomen: a large rounded surface, often with clothing at an edge."""
    yy, xx = _grid(h, w)
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    ry, rx = h * rng.uniform(0.45, 0.8), w * rng.uniform(0.35, 0.6)
    p = rng.uniform(2.5, 4.0)
    r = (np.abs((yy - cy) / ry) ** p + np.abs((xx - cx) / rx) ** p) ** (1.0 / p)
    coverage = _coverage((1.0 - r) * min(rx, ry))
    shade = _cylinder_shade(np.abs(xx - cx) / rx, rng.uniform(0.2, 0.4))
    # a spine furrow or a midline
    shade *= 1.0 - 0.06 * np.exp(-(((xx - cx) / (0.04 * w)) ** 2))
    overlays: list[_Overlay] = []
    if rng.random() < 0.7:
        line = h * rng.uniform(0.72, 0.92) + 6.0 * _smooth_noise(rng, h, w, 40)
        tilt = rng.uniform(-0.15, 0.15) * (xx - cx)
        overlays += _fabric_overlay(rng, _coverage(yy - line - tilt))
    return _Body(coverage, shade.astype(np.float32), overlays, "trunk")


_HAIR = [
    (12, 1, 2),
    (22, 4, 8),
    (32, 8, 16),
    (45, 12, 24),
    (40, 24, 32),
    (62, 4, 26),
    (72, 3, 30),
    (65, 0, 2),
    (80, 0, 3),
]


def _gauss(d: np.ndarray | float, width: float) -> np.ndarray:
    return np.exp(-((np.asarray(d, np.float32) / max(width, 1e-3)) ** 2))


def _face(rng: np.random.Generator, h: int, w: int) -> _Body:
    """A head and shoulders, near or far: an oval with ears, a neck and shaded features (eye
    sockets, the ridge and tip of the nose, lips, chin), hair in one of several styles, eyes
    and brows (not skin) and clothing over the shoulders (sometimes bare shoulders, skin)."""
    yy, xx = _grid(h, w)
    ry = h * rng.uniform(0.14, 0.42)
    cy = rng.uniform(max(ry * 1.05, 0.2 * h), max(ry * 1.05, 0.55 * h))
    cx = w * rng.uniform(0.3, 0.7)
    rx = ry * rng.uniform(0.68, 0.8)
    turn = rx * rng.uniform(-0.25, 0.25)  # a three-quarter view moves the features sideways
    fx = cx + turn
    # the jaw narrows the lower half of the oval
    jaw = np.where(yy > cy, 1.0 + 0.18 * np.clip((yy - cy) / ry, 0, 1), 1.0)
    r = np.hypot((yy - cy) / ry, (xx - cx) * jaw / rx)
    inside = (1.0 - r) * rx
    eye_y = cy - ry * rng.uniform(0.05, 0.15)
    for side in (-1, 1):  # ears, half hidden behind the head when it turns
        ear_x = cx + side * rx * (0.97 - 0.25 * side * turn / rx)
        er = np.hypot((yy - eye_y - ry * 0.12) / (ry * 0.17), (xx - ear_x) / (rx * 0.13))
        inside = np.maximum(inside, (1.0 - er) * rx * 0.13)
    neck_w = rx * rng.uniform(0.5, 0.65)
    neck = np.minimum(neck_w - np.abs(xx - cx - turn * 0.3), yy - cy)
    inside = np.maximum(inside, neck)
    shoulder_y = cy + ry * rng.uniform(1.3, 1.6)
    shoulder_top = shoulder_y + 0.3 * np.maximum(np.abs(xx - cx) - neck_w, 0)
    shoulders = np.minimum(yy - shoulder_top, rx * 2.8 - np.abs(xx - cx))
    bare = rng.random() < 0.25
    if bare:
        inside = np.maximum(inside, shoulders)
    coverage = _coverage(inside)

    shade = _cylinder_shade(
        np.clip(np.minimum(r, np.abs(xx - fx) / rx), 0, 1), rng.uniform(0.2, 0.4)
    )
    shade = np.where(r > 1.0, shade * 0.85, shade)  # the neck and ears lie in shadow
    shade *= 1.0 - 0.25 * _gauss(yy - cy - ry * 1.02, ry * 0.06) * (r > 0.95)  # under the jaw
    for side in (-1, 1):
        ex = fx + side * rx * 0.42
        shade *= 1.0 - 0.14 * _gauss(yy - eye_y, ry * 0.1) * _gauss(xx - ex, rx * 0.3)
    nose_tip = cy + ry * rng.uniform(0.25, 0.35)
    along_nose = (yy > eye_y) & (yy < nose_tip)
    shade *= 1.0 + 0.07 * _gauss(xx - fx, rx * 0.07) * along_nose
    lit = 1.0 if turn >= 0 else -1.0  # the nose shadows the far side
    shade *= 1.0 - 0.18 * _gauss(xx - fx + lit * rx * 0.14, rx * 0.06) * _gauss(
        yy - nose_tip + ry * 0.08, ry * 0.16
    )
    for nostril in (-1, 1):
        shade *= 1.0 - 0.4 * _gauss(
            np.hypot(yy - nose_tip - ry * 0.03, xx - fx - nostril * rx * 0.1), rx * 0.035
        )
    mouth_y = cy + ry * rng.uniform(0.5, 0.6)
    lip = np.hypot((yy - mouth_y) / (ry * 0.07), (xx - fx) / (rx * 0.33))
    lip_alpha = _coverage((1.0 - lip) * 3.0)
    shade *= 1.0 - 0.14 * lip_alpha
    shade *= 1.0 - 0.45 * _gauss(yy - mouth_y, ry * 0.012) * lip_alpha
    shade *= 1.0 - 0.1 * _gauss(yy - cy - ry * 0.78, ry * 0.05) * _gauss(xx - fx, rx * 0.3)
    # flushed cheeks and red lips (skin, not lesion); highlights on forehead, nose, cheekbones
    cheeks = sum(
        _gauss(np.hypot(yy - eye_y - ry * 0.3, xx - fx - s * rx * 0.45), rx * 0.22) for s in (-1, 1)
    )
    flush = np.clip(rng.uniform(0.0, 0.5) * cheeks + rng.uniform(0.3, 0.8) * lip_alpha, 0, 1)
    shine = rng.uniform(0.0, 0.45)
    gloss = _gauss(np.hypot(yy - cy + ry * 0.5, (xx - fx) * 0.5), ry * 0.12)
    gloss = gloss + _gauss(np.hypot(yy - nose_tip + ry * 0.05, xx - fx), rx * 0.07)
    gloss = gloss + 0.6 * _gauss(yy - eye_y, ry * 0.3) * _gauss(xx - fx, rx * 0.06) * along_nose
    for s in (-1, 1):
        gloss = gloss + 0.7 * _gauss(
            np.hypot(yy - eye_y - ry * 0.2, xx - fx - s * rx * 0.5), rx * 0.1
        )
    gloss = np.clip(shine * gloss, 0, 0.6).astype(np.float32)

    overlays: list[_Overlay] = []
    hair_lab = _jitter(rng, _HAIR[int(rng.integers(len(_HAIR)))], 0.6)
    style = str(rng.choice(["none", "short", "short", "long", "long"]))
    if style != "none":
        hairline = cy - ry * rng.uniform(0.3, 0.6) + 0.06 * ry * _smooth_noise(rng, h, w, 20)
        hair_r = np.hypot((yy - cy) / (ry * 1.12), (xx - cx) / (rx * 1.2))
        hair = np.minimum(hairline - yy, (1.0 - hair_r) * rx)
        if style == "long":  # falls beside the face over the ears, to the shoulders or beyond
            length = cy + ry * rng.uniform(0.6, 2.2)
            outer = rx * rng.uniform(1.2, 1.45) - np.abs(xx - cx)
            inner = np.abs(xx - fx) - rx * rng.uniform(0.72, 0.85)
            top = yy - cy + ry * 0.3  # the cap covers the head above
            curtain = np.minimum(np.minimum(outer, inner), np.minimum(length - yy, top))
            hair = np.maximum(hair, curtain)
        alpha = _coverage(hair)
        overlays += _overlay(
            alpha,
            lambda y, x: (
                _textured_layer(rng, y.shape[0], x.shape[1], hair_lab, "wood")
                * (1.0 + 0.15 * _smooth_noise(rng, y.shape[0], x.shape[1], 15))[..., None]
            ),
        )
    eye_dx, eye_rx, eye_ry = rx * 0.42, rx * 0.2, ry * rng.uniform(0.04, 0.065)
    eyes = np.zeros((h, w), np.float32)
    brows = np.zeros((h, w), np.float32)
    for s in (-1, 1):
        ex = fx + s * eye_dx
        er = np.hypot((yy - eye_y) / eye_ry, (xx - ex) / eye_rx)
        eyes = np.maximum(eyes, _coverage((1.0 - er) * eye_ry))
        br = np.hypot((yy - eye_y + ry * 0.16) / (ry * 0.035), (xx - ex) / (eye_rx * 1.25))
        brows = np.maximum(brows, _coverage((1.0 - br) * ry * 0.035))
    iris = _rgb((rng.uniform(15, 45), 3, 10))
    white = _rgb((85, 0, 3))

    def eye_layer(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        iris_alpha = _coverage(eye_ry * 0.95 - np.hypot(y - eye_y, np.abs(x - fx) - eye_dx))
        return white + iris_alpha[..., None] * (iris - white)

    overlays += _overlay(eyes, eye_layer)
    brow_lab = hair_lab if style != "none" else _jitter(rng, _HAIR[1], 0.6)
    overlays += _overlay(brows, lambda y, x: _rgb(brow_lab)[None, None, :])
    if rng.random() < 0.35:  # a smile shows the teeth (not skin) between the lips
        smile = np.hypot((yy - mouth_y - ry * 0.01) / (ry * 0.035), (xx - fx) / (rx * 0.26))
        teeth = _coverage((1.0 - smile) * ry * 0.035)
        enamel = _rgb(_jitter(rng, (88, 0, 8), 0.5))

        def teeth_layer(y: np.ndarray, x: np.ndarray) -> np.ndarray:
            gap = 1.0 - 0.6 * _gauss(y - mouth_y - ry * 0.01, ry * 0.006)
            return enamel[None, None, :] * gap[..., None]

        overlays += _overlay(teeth, teeth_layer)
    if rng.random() < 0.12:  # a beard over chin and jaw
        beard = np.minimum((1.0 - r) * rx, yy - mouth_y - ry * 0.05 + 0.3 * np.abs(xx - fx))
        overlays += _overlay(
            _coverage(beard),
            lambda y, x: _textured_layer(rng, y.shape[0], x.shape[1], hair_lab, "weave"),
        )
    # clothing: over the shoulders and up to a neckline
    # clothing: over the shoulders and the neck below a round or V neckline
    neckline = cy + ry * (rng.uniform(2.0, 2.6) if bare else rng.uniform(1.15, 1.5))
    edge = yy - neckline + rng.uniform(0.0, 0.8) * np.abs(xx - cx)
    clothing = np.minimum(shoulders, edge if bare else np.maximum(edge, -neck))
    overlays += _fabric_overlay(rng, _coverage(clothing))
    return _Body(
        coverage, shade.astype(np.float32), overlays, "face", flush.astype(np.float32), gloss
    )


def _simple_face(rng: np.random.Generator, h: int, w: int, skin_lab: np.ndarray) -> _Body:
    """A face-like oval with a neck, hair, brows and eyes (not skin) and a collar: the face of
    the default generator (:func:`_face` is the realistic one)."""
    yy, xx = _grid(h, w)
    cy, cx = h * rng.uniform(0.38, 0.52), w * rng.uniform(0.4, 0.6)
    ry = h * rng.uniform(0.3, 0.42)
    rx = ry * rng.uniform(0.68, 0.8)
    r = np.hypot((yy - cy) / ry, (xx - cx) / rx)
    inside = (1.0 - r) * rx
    neck_w = rx * 0.55
    neck = np.minimum(neck_w - np.abs(xx - cx), yy - cy)
    inside = np.maximum(inside, neck)
    coverage = _coverage(inside)
    shade = _cylinder_shade(np.minimum(r, np.abs(xx - cx) / rx), rng.uniform(0.25, 0.4))
    shade = np.where(r > 1.0, shade * 0.85, shade).astype(np.float32)  # the neck lies in shadow
    overlays: list[_Overlay] = []
    hair_lab = (rng.uniform(8, 35), rng.uniform(0, 10), rng.uniform(0, 20))
    if rng.random() < 0.85:
        hairline = cy - ry * rng.uniform(0.3, 0.6) + 0.06 * ry * _smooth_noise(rng, h, w, 20)
        hair_r = np.hypot((yy - cy) / (ry * 1.12), (xx - cx) / (rx * 1.18))
        alpha = _coverage(np.minimum(hairline - yy, (1.0 - hair_r) * rx))
        overlays += _overlay(
            alpha, lambda y, x: _textured_layer(rng, y.shape[0], x.shape[1], hair_lab, "wood")
        )
    eye_y = cy - ry * rng.uniform(0.05, 0.15)
    eye_dx, eye_rx, eye_ry = rx * 0.42, rx * 0.2, ry * 0.055
    eyes = np.zeros((h, w), np.float32)
    brows = np.zeros((h, w), np.float32)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        er = np.hypot((yy - eye_y) / eye_ry, (xx - ex) / eye_rx)
        eyes = np.maximum(eyes, _coverage((1.0 - er) * eye_ry))
        br = np.hypot((yy - eye_y + ry * 0.16) / (eye_ry * 0.6), (xx - ex) / (eye_rx * 1.2))
        brows = np.maximum(brows, _coverage((1.0 - br) * eye_ry * 0.6))
    iris = _rgb((rng.uniform(15, 45), 3, 10))
    white = _rgb((88, 0, 3))

    def eye_layer(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        iris_alpha = _coverage(eye_ry * 0.95 - np.hypot(y - eye_y, np.abs(x - cx) - eye_dx))
        return white + iris_alpha[..., None] * (iris - white)

    overlays += _overlay(eyes, eye_layer)
    overlays += _overlay(brows, lambda y, x: _rgb(hair_lab)[None, None, :])
    if rng.random() < 0.8:
        collar = cy + ry * rng.uniform(1.25, 1.6) + 0.1 * np.abs(xx - cx)
        overlays += _fabric_overlay(rng, _coverage(yy - collar))
    # lips are skin (they are labelled skin), drawn as a darker, redder relief
    lip = np.hypot((yy - cy - ry * 0.55) / (ry * 0.07), (xx - cx) / (rx * 0.35))
    shade = shade * (1.0 - 0.12 * _coverage((1.0 - lip) * 3.0))
    return _Body(coverage, shade.astype(np.float32), overlays, "face")


def _hand(rng: np.random.Generator, h: int, w: int) -> _Body:
    """A hand with its wrist: palm, four fingers (spread, sometimes bent) and a thumb, creases
    at the knuckles and lighter nails; the forearm leaves the frame, often in a sleeve."""
    short = min(h, w)
    yy, xx = _half_grid(h, w)
    angle = rng.uniform(0, 2 * math.pi)
    d = np.array([math.sin(angle), math.cos(angle)])  # towards the fingertips
    n = np.array([-d[1], d[0]])
    pw = rng.uniform(0.07, 0.15) * short  # half the palm's width
    pl = pw * rng.uniform(1.0, 1.2)  # half its length
    palm = np.array([h / 2, w / 2]) + rng.normal(0, 0.12, 2) * (h, w) - d * pl * 0.8
    u = (yy - palm[0]) * d[0] + (xx - palm[1]) * d[1]
    v = (yy - palm[0]) * n[0] + (xx - palm[1]) * n[1]
    rp = (np.abs(u / pl) ** 3 + np.abs(v / pw) ** 3) ** (1 / 3)
    inside = (1.0 - rp) * pw
    ratio = np.clip(rp * 0.6, 0, 1)
    span = math.hypot(h, w)
    wrist = palm - d * pl * 0.8
    arm_pts = np.stack([wrist, wrist - d * span * 0.6, wrist - d * span * 1.2])
    arm_r, arm_along = _limb_distance(yy, xx, arm_pts, np.array([pw * 0.8, pw * 1.0, pw * 1.1]))
    arm_inside = (1.0 - arm_r) * pw * 0.9
    better = arm_inside > inside
    ratio = np.where(better, arm_r, ratio)
    inside = np.maximum(inside, arm_inside)
    crease = np.zeros_like(inside)
    nails = np.zeros_like(inside)
    fw = pw * rng.uniform(0.19, 0.23)
    spread = rng.uniform(0.0, 0.3)
    curl = rng.uniform(0.0, 0.9) if rng.random() < 0.4 else rng.uniform(0.0, 0.2)
    for k, offset in enumerate((0.72, 0.24, -0.24, -0.72)):
        base = palm + d * pl * 0.85 + n * offset * pw
        direction = d * math.cos(offset * spread) + n * math.sin(offset * spread)
        normal = np.array([-direction[1], direction[0]])
        length = pw * (1.1, 1.45, 1.35, 1.05)[k] * rng.uniform(0.9, 1.1)
        mid = base + direction * length * 0.5
        bent = direction * math.cos(curl) - normal * math.sin(curl) * 0.3
        tip = mid + bent * length * 0.5
        pts = np.stack([base, mid, tip])
        fr, along = _limb_distance(yy, xx, pts, np.array([fw, fw * 0.95, fw * 0.82]))
        f_inside = (1.0 - fr) * fw
        better = f_inside > inside
        ratio = np.where(better, fr, ratio)
        inside = np.maximum(inside, f_inside)
        t = along / length
        for knuckle in (0.38, 0.72):
            crease = np.maximum(crease, _gauss(t - knuckle, 0.025) * (fr < 1))
        nails = np.maximum(nails, np.clip((t - 0.8) / 0.05, 0, 1) * (fr < 0.7))
    thumb_side = float(rng.choice([-1.0, 1.0]))
    t_base = palm - d * pl * 0.2 + n * thumb_side * pw * 0.8
    t_dir = d * 0.55 + n * thumb_side * 0.85
    t_dir /= np.linalg.norm(t_dir)
    t_len = pw * rng.uniform(1.0, 1.3)
    t_pts = np.stack([t_base, t_base + t_dir * t_len * 0.5, t_base + (t_dir + d) / 2 * t_len])
    tr, _ = _limb_distance(yy, xx, t_pts, np.array([fw * 1.35, fw * 1.15, fw]))
    t_inside = (1.0 - tr) * fw * 1.2
    ratio = np.where(t_inside > inside, tr, ratio)
    inside = np.maximum(inside, t_inside)
    inside, ratio, crease, nails, arm_r, arm_along = (
        _upsample(f, h, w) for f in (inside, ratio, crease, nails, arm_r, arm_along)
    )
    coverage = _coverage(inside)
    shade = _cylinder_shade(np.clip(ratio, 0, 1), rng.uniform(0.25, 0.45))
    shade *= 1.0 - 0.15 * crease
    shade *= 1.0 + 0.1 * nails
    overlays: list[_Overlay] = []
    if rng.random() < 0.6:  # a sleeve over the forearm
        cut = pl * rng.uniform(0.3, 2.5) + 3.0 * _smooth_noise(rng, h, w, 25)
        sleeve = np.minimum(arm_along - cut, (1.3 - arm_r) * pw)
        overlays += _fabric_overlay(rng, _coverage(sleeve))
    return _Body(coverage, shade.astype(np.float32), overlays, "hand")


def _closeup(rng: np.random.Generator, h: int, w: int) -> _Body:
    """Skin fills most of the frame; a curved edge of the body may leave some background."""
    yy, xx = _grid(h, w)
    shade = (1.0 + 0.06 * _smooth_noise(rng, h, w, max(h, w) / 1.5)).astype(np.float32)
    if rng.random() < 0.7:
        angle = rng.uniform(0, 2 * math.pi)
        u = (yy - h / 2) * math.sin(angle) + (xx - w / 2) * math.cos(angle)
        reach = rng.uniform(0.2, 0.5) * math.hypot(h, w)
        bulge = (
            rng.uniform(0.0, 0.6)
            * ((yy - h / 2) * math.cos(angle) - (xx - w / 2) * math.sin(angle)) ** 2
            / max(h, w)
        )
        edge = reach - bulge + 5.0 * _smooth_noise(rng, h, w, 40)
        inside = edge - u
        coverage = _coverage(inside)
        # the surface turns away near its edge
        shade *= (0.65 + 0.35 * np.clip(inside / (0.15 * min(h, w)), 0, 1)).astype(np.float32)
    else:
        coverage = np.ones((h, w), np.float32)
    return _Body(coverage, shade, [], "closeup")


def _ruler(rng: np.random.Generator, h: int, w: int) -> list[_Overlay]:
    """A photographic scale placed on or beside the skin (clinic photos often have one)."""
    yy, xx = _grid(h, w)
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    angle = rng.uniform(0, math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    u = (yy - cy) * sin + (xx - cx) * cos
    v = (yy - cy) * cos - (xx - cx) * sin
    length, width = rng.uniform(0.3, 0.7) * max(h, w), rng.uniform(0.035, 0.06) * min(h, w)
    alpha = _coverage(np.minimum(length / 2 - np.abs(u), width / 2 - np.abs(v)))
    colour = _rgb((rng.uniform(80, 95), rng.uniform(-2, 2), rng.uniform(0, 40)))
    period = rng.uniform(6, 12)
    tick_reach = -width * rng.uniform(-0.1, 0.2)

    def layer(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        bu = (y - cy) * sin + (x - cx) * cos
        bv = (y - cy) * cos - (x - cx) * sin
        ticks = ((bu % period) < 1.2) & (bv < tick_reach)
        return colour * np.where(ticks, 0.15, 1.0)[..., None]

    return _overlay(alpha, layer)


# --------------------------------------------------------------------------- skin
def _sample_skin_lab(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Draw ITA° uniformly over the typology range and build the skin colour in CIELAB."""
    ita = rng.uniform(*ITA_RANGE)
    # b* (yellowness) and a* (redness) vary at every tone; L* follows from ITA and b*.
    b = rng.uniform(9.0, 14.0) if ita > 45 else rng.uniform(12.0, 22.0)
    lightness = 50.0 + b * math.tan(math.radians(ita))
    lightness = float(np.clip(lightness, 20.0, 90.0))
    a = rng.uniform(6.0, 16.0) if lightness > 35 else rng.uniform(5.0, 11.0)
    actual = math.degrees(math.atan2(lightness - 50.0, b))
    return np.array([lightness, a, b]), actual


def _skin_image(
    rng: np.random.Generator, h: int, w: int, skin_lab: np.ndarray, px_per_cm: float
) -> np.ndarray:
    """Skin with mottled tone, pores, fine lines and sparse hair."""
    base = _rgb(skin_lab)
    redder = _rgb(skin_lab + np.array([-3.0, 6.0, 1.0]))
    mottle = np.clip(0.5 + 0.35 * _smooth_noise(rng, h, w, 4 * px_per_cm), 0, 1)
    # pores and fine texture modulate the brightness by a few per cent
    grain = _fine_grain(rng, h, w, max(1.6, 0.06 * px_per_cm), 0.03)
    image = (base * grain[..., None]) + (mottle * grain)[..., None] * (redder - base)
    if rng.random() < 0.6:
        n = int(rng.integers(20, 120))
        ys, xs = rng.uniform(0, h, n), rng.uniform(0, w, n)
        angle = rng.uniform(0, 2 * math.pi) + rng.normal(0, 0.3, n)
        length = rng.uniform(0.3, 0.8, n) * px_per_cm

        def draw(d: ImageDraw.ImageDraw) -> None:
            for y, x, a, ln in zip(ys, xs, angle, length, strict=True):
                d.line([(x, y), (x + ln * math.cos(a), y + ln * math.sin(a))], fill=200, width=1)

        hair = _stroke_mask(h, w, draw)
        hair_colour = _rgb((max(8.0, skin_lab[0] - 35.0), 3.0, 8.0))
        _blend(image, hair * rng.uniform(0.3, 0.7), hair_colour)
    return image.astype(np.float32)


# --------------------------------------------------------------------------- lesions
def _pick_centre(
    rng: np.random.Generator, skin: np.ndarray, near: tuple[float, float] | None, spread: float
) -> tuple[float, float]:
    h, w = skin.shape
    if near is not None:
        for _ in range(20):
            y, x = near[0] + rng.normal(0, spread), near[1] + rng.normal(0, spread)
            if 0 <= y < h and 0 <= x < w and skin[int(y), int(x)]:
                return y, x
    idx = np.flatnonzero(skin)
    k = int(idx[rng.integers(len(idx))])
    return float(k // w), float(k % w)


def _irregular_radius(rng: np.random.Generator, theta: np.ndarray, amount: float) -> np.ndarray:
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += rng.uniform(0, amount) / k**0.5 * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return r


def _shift_lab(skin_lab: np.ndarray, dl: float, da: float, db: float) -> np.ndarray:
    lab = skin_lab + np.array([dl, da, db])
    lab[0] = np.clip(lab[0], 8.0, 95.0)
    return _rgb(lab)


def _erythema(rng: np.random.Generator, skin_lab: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Inflamed skin: redder and darker on light skin, dusky and darker on dark skin."""
    if skin_lab[0] > 45:
        shift = (rng.uniform(-12, -5), rng.uniform(12, 24), rng.uniform(-2, 6))
    else:
        shift = (rng.uniform(-14, -8), rng.uniform(6, 14), rng.uniform(-4, 2))
    return _shift_lab(skin_lab, *(s * strength for s in shift))


def _atopic_dermatitis(
    rng: np.random.Generator, image: np.ndarray, skin: np.ndarray, skin_lab: np.ndarray, ppc: float
) -> tuple[np.ndarray, int]:
    h, w = skin.shape
    alpha = np.zeros((h, w), np.float32)
    n = int(rng.integers(1, 4))
    cluster: tuple[float, float] | None = None
    for _ in range(n):
        radius = rng.uniform(1.5, 4.5) * ppc
        cy, cx = _pick_centre(rng, skin, cluster, radius * 2)
        cluster = (cy, cx)
        win = _window(cy, cx, radius * 1.6, h, w)
        if win is None:
            continue
        hh, ww = win.yy.shape
        stretch = rng.uniform(0.6, 1.0)
        angle = rng.uniform(0, math.pi)
        u = win.xx * math.cos(angle) + win.yy * math.sin(angle)
        v = -win.xx * math.sin(angle) + win.yy * math.cos(angle)
        r = np.hypot(u, v / stretch) / radius
        field = 1.0 - r + 0.35 * _smooth_noise(rng, hh, ww, radius / 1.5)
        # ill-defined: a wide ramp from normal to inflamed skin
        local = np.clip(field / 0.35 + 0.5, 0, 1) ** 1.0
        alpha[win.rows, win.cols] = np.maximum(alpha[win.rows, win.cols], local)
    alpha *= skin
    rows, cols = np.nonzero(alpha > 0)
    if rows.size == 0:
        return alpha, n
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    a = alpha[r0:r1, c0:c1]
    region = image[r0:r1, c0:c1]
    hh, ww = a.shape
    red = _erythema(rng, skin_lab)
    patchy = np.clip(0.85 + 0.25 * _smooth_noise(rng, hh, ww, 0.6 * ppc), 0.4, 1.0)
    _blend(region, a * patchy, red)
    # lichenification: two families of accentuated skin lines crossing each other
    yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float32)
    period = rng.uniform(3.0, 5.5) * max(1.0, ppc / 18.0)
    hatch = np.zeros((hh, ww), np.float32)
    theta = rng.uniform(0, math.pi)
    for t in (theta, theta + rng.uniform(0.9, 1.6)):
        warp = 1.2 * _smooth_noise(rng, hh, ww, 3 * period)
        phase = (xx * math.cos(t) + yy * math.sin(t)) / period + warp
        hatch = np.maximum(hatch, np.clip((np.cos(2 * math.pi * phase) - 0.55) / 0.45, 0, 1))
    depth = rng.uniform(0.22, 0.35)
    thick = np.clip((a - 0.3) / 0.5, 0, 1)
    region *= (1.0 - depth * hatch * thick)[..., None]
    # scale between the lines and a few excoriations
    scale = np.clip(_smooth_noise(rng, hh, ww, 1.5) - 1.2, 0, 1) * thick
    _blend(region, scale * 0.5, _shift_lab(skin_lab, 15, -4, -4))
    m = int(rng.integers(2, 8))

    def scratches(d: ImageDraw.ImageDraw) -> None:
        for _ in range(m):
            y, x = rng.uniform(0, hh), rng.uniform(0, ww)
            ang, ln = rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 1.0) * ppc
            d.line([(x, y), (x + ln * math.cos(ang), y + ln * math.sin(ang))], fill=255, width=2)

    excoriation = _stroke_mask(hh, ww, scratches) * thick
    _blend(region, excoriation * 0.8, _shift_lab(skin_lab, -18, 25, 8))
    return alpha, n


def _mycosis_fungoides(
    rng: np.random.Generator, image: np.ndarray, skin: np.ndarray, skin_lab: np.ndarray, ppc: float
) -> tuple[np.ndarray, int]:
    h, w = skin.shape
    alpha = np.zeros((h, w), np.float32)
    n = int(rng.integers(1, 6))
    for _ in range(n):
        radius = math.exp(rng.uniform(math.log(0.8), math.log(5.0))) * ppc
        radius = max(radius, 5.0)
        cy, cx = _pick_centre(rng, skin, None, 0)
        win = _window(cy, cx, radius * 1.7, h, w)
        if win is None:
            continue
        hh, ww = win.yy.shape
        theta = np.arctan2(win.yy, win.xx)
        stretch = rng.uniform(0.6, 1.0)
        boundary = radius * _irregular_radius(rng, theta, 0.35)
        r = np.hypot(win.xx, win.yy / stretch)
        # well demarcated: the coverage goes from 0 to 1 within about one pixel
        local = _coverage(boundary - r, ramp=1.2)
        if rng.random() < 0.4 and radius > 1.5 * ppc:
            inner = boundary * rng.uniform(0.45, 0.7)
            clearing = _coverage(inner - r, ramp=2.5)
            local = local * (1.0 - clearing * rng.uniform(0.7, 0.85))
        if skin_lab[0] > 45:
            if rng.random() < 0.6:  # salmon
                colour = _shift_lab(
                    skin_lab, rng.uniform(-9, -3), rng.uniform(10, 20), rng.uniform(4, 12)
                )
            else:  # brownish red
                colour = _shift_lab(
                    skin_lab, rng.uniform(-20, -10), rng.uniform(4, 10), rng.uniform(6, 12)
                )
        elif rng.random() < 0.5:  # hyperpigmented
            colour = _shift_lab(
                skin_lab, rng.uniform(-16, -10), rng.uniform(2, 8), rng.uniform(-2, 4)
            )
        else:  # hypopigmented, common on dark skin
            colour = _shift_lab(
                skin_lab, rng.uniform(10, 18), rng.uniform(-4, 0), rng.uniform(-4, 0)
            )
        region = image[win.rows, win.cols]
        a = local * skin[win.rows, win.cols]
        mottled = np.clip(0.9 + 0.1 * _smooth_noise(rng, hh, ww, 0.4 * ppc), 0.7, 1.0)
        _blend(region, a * mottled, colour)
        scale = np.clip(_smooth_noise(rng, hh, ww, 1.2) - 1.0, 0, 1) * a
        _blend(region, scale * rng.uniform(0.3, 0.6), _shift_lab(skin_lab, 20, -5, -6))
        alpha[win.rows, win.cols] = np.maximum(alpha[win.rows, win.cols], a)
    return alpha, n


def _impetigo(
    rng: np.random.Generator, image: np.ndarray, skin: np.ndarray, skin_lab: np.ndarray, ppc: float
) -> tuple[np.ndarray, int]:
    h, w = skin.shape
    alpha = np.zeros((h, w), np.float32)
    n = int(rng.integers(1, 6))
    cluster: tuple[float, float] | None = None
    for _ in range(n):
        radius = max(rng.uniform(0.5, 2.2) * ppc, 6.0)
        cy, cx = _pick_centre(rng, skin, cluster, 3 * ppc)
        cluster = cluster or (cy, cx)
        win = _window(cy, cx, radius * 1.6, h, w)
        if win is None:
            continue
        hh, ww = win.yy.shape
        theta = np.arctan2(win.yy, win.xx)
        r = np.hypot(win.xx, win.yy / rng.uniform(0.65, 1.0))
        boundary = radius * _irregular_radius(rng, theta, 0.3)
        base = _coverage(boundary - r, ramp=2.0) * skin[win.rows, win.cols]
        region = image[win.rows, win.cols]
        _blend(region, base, _erythema(rng, skin_lab, rng.uniform(1.0, 1.3)))
        # honey-coloured crusts: clumps on the erosion, glossy and bumpy
        clumps = _smooth_noise(rng, hh, ww, max(2.5, radius / 3)) + 1.2 * (1 - r / boundary)
        crust = np.clip((clumps - rng.uniform(0.0, 0.6)) / 0.3, 0, 1) * base
        crust_lab = (
            rng.uniform(55, 76) if skin_lab[0] > 40 else rng.uniform(45, 62),
            rng.uniform(6, 18),
            rng.uniform(38, 60),
        )
        bumps = 1.0 + 0.18 * _smooth_noise(rng, hh, ww, 1.8)
        crust_rgb = _rgb(crust_lab)[None, None, :] * bumps[..., None]
        _blend(region, crust, crust_rgb)
        gloss = np.clip(_smooth_noise(rng, hh, ww, 2.0) - 1.6, 0, 1) * crust
        _blend(region, gloss, np.array([1.0, 0.97, 0.85], np.float32))
        alpha[win.rows, win.cols] = np.maximum(alpha[win.rows, win.cols], base)
    return alpha, n


def _herpes(
    rng: np.random.Generator, image: np.ndarray, skin: np.ndarray, skin_lab: np.ndarray, ppc: float
) -> tuple[np.ndarray, int]:
    h, w = skin.shape
    alpha = np.zeros((h, w), np.float32)
    clusters = int(rng.integers(1, 4))
    total = 0
    vesicle_lab = skin_lab + np.array([rng.uniform(8, 16), -4.0, rng.uniform(2, 8)])
    vesicle_rgb = _rgb(vesicle_lab)
    erosion_rgb = _shift_lab(
        skin_lab, rng.uniform(-18, -10), rng.uniform(20, 30), rng.uniform(2, 8)
    )
    rim_rgb = _shift_lab(skin_lab, -25, 8, 8)
    for _ in range(clusters):
        cluster_r = rng.uniform(0.6, 1.8) * ppc
        cy, cx = _pick_centre(rng, skin, None, 0)
        count = int(rng.integers(6, 22))
        total += count
        vr = np.maximum(rng.uniform(0.09, 0.2, count) * ppc, 2.0)
        ys = cy + rng.normal(0, cluster_r / 2, count)
        xs = cx + rng.normal(0, cluster_r / 2, count)
        reach = float(np.max(np.hypot(ys - cy, xs - cx) + 2.6 * vr)) + 2
        win = _window(cy, cx, reach, h, w)
        if win is None:
            continue
        hh, ww = win.yy.shape
        region = image[win.rows, win.cols]
        on_skin = skin[win.rows, win.cols]
        # red base: the union of haloes around the vesicles, smoothed into a grouped plaque
        base_field = np.full((hh, ww), -np.inf, np.float32)
        dists = []
        for y, x, r in zip(ys, xs, vr, strict=True):
            d = np.hypot(win.yy - (y - cy), win.xx - (x - cx))
            dists.append(d)
            base_field = np.maximum(base_field, 2.3 * r - d)
        base_field = ndimage.gaussian_filter(base_field, 1.5)
        base = _coverage(base_field, ramp=2.0) * on_skin
        _blend(region, base, _erythema(rng, skin_lab, rng.uniform(0.9, 1.2)))
        lesion = base.copy()
        for d, r in zip(dists, vr, strict=True):
            dome = _coverage(r - d, ramp=1.0) * on_skin
            if rng.random() < 0.35:
                # punched-out erosion: sharp edge, raw red floor, a dark rim
                rim = _coverage(r + 1.2 - d, ramp=1.0) * on_skin - dome
                _blend(region, np.clip(rim, 0, 1) * 0.7, rim_rgb)
                _blend(region, dome, erosion_rgb)
            else:
                # a domed vesicle: pale, translucent, lit from the upper left
                _blend(region, dome * 0.85, vesicle_rgb)
                sheen = np.clip(1.0 - d / (0.45 * r), 0, 1) * dome
                _blend(region, sheen * 0.8, np.array([1.0, 1.0, 0.97], np.float32))
            lesion = np.maximum(lesion, dome)
        alpha[win.rows, win.cols] = np.maximum(alpha[win.rows, win.cols], lesion)
    return alpha, total


_LESION_PAINTERS = {
    "atopic_dermatitis": _atopic_dermatitis,
    "mycosis_fungoides": _mycosis_fungoides,
    "impetigo": _impetigo,
    "herpesvirus_infection": _herpes,
}


# --------------------------------------------------------------------------- camera
def _lighting(
    rng: np.random.Generator, image: np.ndarray, params: dict[str, Any], metered: bool = False
) -> np.ndarray:
    h, w, _ = image.shape
    yy, xx = _grid(h, w)
    gradient = rng.uniform(0.0, 0.45)
    angle = rng.uniform(0, 2 * math.pi)
    u = ((xx / w - 0.5) * math.cos(angle) + (yy / h - 0.5) * math.sin(angle)) * 2
    light = 1.0 + gradient * u / 2
    vignette = rng.uniform(0.0, 0.35)
    light *= 1.0 - vignette * (((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * 2)
    light *= 1.0 + 0.05 * _smooth_noise(rng, h, w, max(h, w) / 3)
    shadow = 0.0
    if rng.random() < 0.45:
        shadow = rng.uniform(0.25, 0.55)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ang = rng.uniform(0, 2 * math.pi)
        edge = (yy - cy) * math.sin(ang) + (xx - cx) * math.cos(ang)
        edge += 12.0 * _smooth_noise(rng, h, w, 60)
        soft = rng.uniform(3.0, 30.0)
        light *= 1.0 - shadow * (0.5 + 0.5 * np.tanh(edge / soft))
    warmth = rng.uniform(-0.12, 0.12)
    balance = np.array([1.0 + warmth, 1.0, 1.0 - warmth], np.float32)
    exposure = rng.uniform(0.75, 1.2)
    if metered and rng.random() < 0.6:
        # metered like a camera's automatic exposure: the brightest parts of the frame come out
        # near white (shading, light fall-off and shadows alone would keep light skin grey)
        bright = float(np.percentile((image[::4, ::4].mean(axis=2) * light[::4, ::4]), 99))
        exposure = float(np.clip(rng.uniform(0.85, 1.0) / max(bright, 1e-3), 0.6, 2.5))
    params.update(
        illumination_gradient=round(gradient, 3),
        shadow=round(shadow, 3),
        white_balance=round(warmth, 3),
        exposure=round(exposure, 3),
    )
    # scaled to 8-bit levels here, which saves the camera a pass over the image
    image *= (light * (exposure * 255.0))[..., None]
    image *= balance
    return image


def _camera(
    rng: np.random.Generator, image: np.ndarray, params: dict[str, Any], rendering: bool = False
) -> np.ndarray:
    """Optics, sensor and encoder: defocus blur, noise, JPEG compression (8-bit levels in);
    with ``rendering`` also the camera's saturation and contrast."""
    blur = rng.uniform(0.3, 1.8) if rng.random() < 0.6 else 0.0
    noise = rng.uniform(0.5, 6.0)
    if rendering:
        # a camera renders colours more saturated and contrasted than a colorimeter measures
        saturation, contrast = rng.uniform(0.9, 1.4), rng.uniform(0.9, 1.25)
        grey = image.mean(axis=2, keepdims=True)
        image += (saturation - 1.0) * (image - grey)
        image -= 127.5
        image *= contrast
        image += 127.5
    if blur > 0:
        image = ndimage.gaussian_filter(image, sigma=(blur, blur, 0), truncate=3.0)
    # sensor noise: the sum of two uniform bytes (triangular, close to normal) costs a tenth of
    # drawing normal deviates
    pairs = np.frombuffer(rng.bytes(2 * image.size), np.uint8).reshape(2, *image.shape)
    sensor = pairs[0].astype(np.float32)
    sensor += pairs[1]
    sensor -= 255.0
    sensor *= noise / 104.4  # the spread of the sum of two uniform bytes
    image += sensor
    pixels = np.clip(image, 0, 255, out=image).astype(np.uint8)
    quality = int(rng.integers(35, 96)) if rng.random() < 0.8 else 0
    if quality:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        pixels = np.asarray(Image.open(buffer).convert("RGB"))
    params.update(blur_sigma=round(blur, 3), noise_sigma=round(noise, 3), jpeg_quality=quality)
    return pixels


# --------------------------------------------------------------------------- one photo
@dataclass(frozen=True)
class SyntheticPhoto:
    """One generated photo: RGB pixels, the exact label map, the disease and how it was made."""

    image: np.ndarray  # (rows, columns, 3) uint8
    mask: np.ndarray  # (rows, columns) uint8: BACKGROUND, SKIN, LESION
    label: str
    parameters: dict[str, Any]


def photo_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of photo ``index`` of the set ``seed``: independent of the others."""
    return np.random.default_rng([int(seed), int(index)])


def generate_photo(
    seed: int,
    index: int,
    long_side: int = 512,
    classes: Sequence[str] = CLASSES,
    closeup_probability: float = 0.4,
    negative_fraction: float = 0.0,
    realistic: bool = False,
) -> SyntheticPhoto:
    """Generate photo ``index`` of the synthetic set ``seed``.

    Parameters
    ----------
    seed, index
        Together they seed the photo's own random generator: the same pair gives the same photo.
    long_side
        Pixels along the longer side; the aspect ratio is drawn (4:3, 3:2, 1:1, either way up).
    classes
        Disease names to draw from, uniformly; each must be one of :data:`CLASSES`.
    closeup_probability
        Share of close-ups; the rest are long shots of a body region.
    negative_fraction
        Share of negatives: photos without any skin (skies, leaves, animals, wood, cloth, food,
        flowers, cups), labelled :data:`NEGATIVE_LABEL` with an all-background mask. Whether
        photo ``index`` is one is drawn from a stream of its own, so the other photos of a set
        are the same whatever this share.
    realistic
        People as in ordinary photographs (docs/training.md): heads and shoulders near and far
        with shaded features, hair, teeth and clothing, hands with fingers, a third of the long
        shots in front of the negatives' scenes, and a camera that meters its exposure and
        renders colours more saturated and contrasted. Off, the generator draws exactly the
        photos of earlier versions (those the shipped weights were evaluated on).

    Returns
    -------
    SyntheticPhoto
    """
    if long_side < 64:
        raise SynthError(f"long_side must be at least 64 px, got {long_side}")
    unknown = [c for c in classes if c not in _LESION_PAINTERS]
    if unknown or not classes:
        raise SynthError(f"unknown classes {unknown}; the generator draws {list(CLASSES)}")
    if not 0.0 <= negative_fraction <= 1.0:
        raise SynthError(f"negative_fraction must be within 0..1, got {negative_fraction}")
    negative_rng = np.random.default_rng([int(seed), int(index), 1])
    if negative_rng.random() < negative_fraction:
        return _negative_photo(negative_rng, seed, index, long_side, realistic)
    rng = photo_rng(seed, index)
    label = str(classes[int(rng.integers(len(classes)))])
    aspect = float(rng.choice([0.75, 2 / 3, 1.0, 0.75]))
    short = 2 * int(round(long_side * aspect / 2))
    h, w = (short, long_side) if rng.random() < 0.6 else (long_side, short)
    params: dict[str, Any] = {"seed": seed, "index": index, "width": w, "height": h}

    skin_lab, ita = _sample_skin_lab(rng)
    closeup = rng.random() < closeup_probability
    scale = long_side / 512.0
    if closeup:
        ppc = rng.uniform(22, 40) * scale
        body = _closeup(rng, h, w)
    else:
        ppc = rng.uniform(13, 20) * scale
        region = str(rng.choice(REALISTIC_LONG_SHOT_REGIONS if realistic else LONG_SHOT_REGIONS))
        if region == "trunk":
            body = _trunk(rng, h, w)
        elif region == "face":
            body = _face(rng, h, w) if realistic else _simple_face(rng, h, w, skin_lab)
        elif region == "hand":
            body = _hand(rng, h, w)
        else:
            body = _limb(rng, h, w, region)
    overlays = list(body.overlays)
    if rng.random() < 0.2:
        overlays += _ruler(rng, h, w)

    skin = body.coverage >= 0.5
    for overlay in overlays:
        skin &= overlay.alpha < 0.5
    if skin.sum() < 0.04 * h * w:
        # a frame with almost no skin teaches little: fall back to a close-up of the same person
        body = _closeup(rng, h, w)
        overlays = []
        skin = body.coverage >= 0.5
        closeup = True
        ppc = rng.uniform(22, 40) * scale

    surface = _skin_image(rng, h, w, skin_lab, ppc)
    if body.flush is not None:
        _blend(surface, body.flush, _rgb(skin_lab + np.array([-6.0, 16.0, 3.0])))
    # A clinical photo is taken because of its lesion: keep drawing until it shows enough of it.
    paint = _LESION_PAINTERS[label]
    lesion_alpha, n_lesions = paint(rng, surface, skin, skin_lab, ppc)
    wanted = MIN_LESION_FRACTION * min(h * w, skin.sum() * 4)
    for _ in range(4):
        if np.count_nonzero(lesion_alpha >= 0.5) >= wanted:
            break
        more, n_more = paint(rng, surface, skin, skin_lab, ppc)
        np.maximum(lesion_alpha, more, out=lesion_alpha)
        n_lesions += n_more
    surface *= body.shade[..., None]
    if body.gloss is not None:
        _blend(surface, body.gloss, np.array([0.97, 0.95, 0.92], np.float32))

    if closeup:
        params["background"] = "closeup"
        photo = _background(rng, h, w, {}) if body.coverage.min() < 0.5 else surface.copy()
    elif realistic and rng.random() < OUTDOOR_SHARE:
        # people are also photographed outdoors, with pets, food and things that share skin's
        # colours: the negatives' scenes behind the body
        photo = _negative_scene(rng, h, w, params)
    else:
        photo = _background(rng, h, w, params)
    _blend(photo, body.coverage, surface)
    for overlay in overlays:
        _blend(photo, overlay.alpha, overlay.layer, overlay.box)
    photo = _lighting(rng, photo, params, metered=realistic)
    pixels = _camera(rng, photo, params, rendering=realistic)

    mask = np.full((h, w), BACKGROUND, np.uint8)
    mask[skin] = SKIN
    mask[skin & (lesion_alpha >= 0.5)] = LESION
    params.update(
        scene="closeup" if closeup else "long_shot",
        body_region=body.region,
        ita=round(ita, 2),
        ita_category=ita_category(ita),
        skin_l=round(float(skin_lab[0]), 2),
        skin_a=round(float(skin_lab[1]), 2),
        skin_b=round(float(skin_lab[2]), 2),
        px_per_cm=round(ppc, 2),
        n_lesions=n_lesions,
        skin_fraction=round(float((mask > 0).mean()), 4),
        lesion_fraction=round(float((mask == LESION).mean()), 4),
    )
    params.setdefault("background", "closeup")
    return SyntheticPhoto(pixels, mask, label, params)


def _negative_photo(
    rng: np.random.Generator, seed: int, index: int, long_side: int, realistic: bool = False
) -> SyntheticPhoto:
    """A photo without skin: a negative scene through the same light and camera as the others."""
    aspect = float(rng.choice([0.75, 2 / 3, 1.0, 0.75]))
    short = 2 * int(round(long_side * aspect / 2))
    h, w = (short, long_side) if rng.random() < 0.6 else (long_side, short)
    params: dict[str, Any] = {"seed": seed, "index": index, "width": w, "height": h}
    photo = _negative_scene(rng, h, w, params)
    photo = _lighting(rng, photo, params, metered=realistic)
    pixels = _camera(rng, photo, params, rendering=realistic)
    params.update(
        scene="negative",
        body_region="",
        n_lesions=0,
        skin_fraction=0.0,
        lesion_fraction=0.0,
    )
    mask = np.full((h, w), BACKGROUND, np.uint8)
    return SyntheticPhoto(pixels, mask, NEGATIVE_LABEL, params)


# --------------------------------------------------------------------------- a set on disk
def _write_one(job: tuple[Path, int, int, int, tuple[str, ...], float, bool]) -> dict[str, Any]:
    out, seed, index, long_side, classes, negative_fraction, realistic = job
    photo = generate_photo(
        seed, index, long_side, classes, negative_fraction=negative_fraction, realistic=realistic
    )
    name = f"synth_{seed}_{index:06d}.png"
    Image.fromarray(photo.image).save(out / "images" / name, compress_level=1)
    Image.fromarray(photo.mask).save(out / "masks" / name, compress_level=1)
    return {"image": name, "label": photo.label, **photo.parameters}


def iter_write_synthetic_set(
    out: str | Path,
    count: int,
    seed: int,
    long_side: int = 512,
    classes: Sequence[str] = CLASSES,
    workers: int = 1,
    negative_fraction: float = 0.0,
    realistic: bool = False,
) -> Iterator[dict[str, Any]]:
    """Write ``count`` photos under ``out`` and yield each ``labels.csv`` row as it is done.

    ``labels.csv`` is written once all photos are; rows are in index order whatever ``workers``.
    With ``negative_fraction`` > 0 some rows are negatives (label :data:`NEGATIVE_LABEL`, all
    background): such a set trains segmentation only; the classifier and the evaluation refuse
    the label.
    """
    if count < 1:
        raise SynthError(f"count must be at least 1, got {count}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    jobs = [
        (out, seed, i, long_side, tuple(classes), negative_fraction, realistic)
        for i in range(count)
    ]
    rows: list[dict[str, Any]] = []
    if workers <= 1:
        for job in jobs:
            rows.append(_write_one(job))
            yield rows[-1]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for row in pool.map(_write_one, jobs, chunksize=8):
                rows.append(row)
                yield row
    with open(out / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(LABEL_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in LABEL_COLUMNS})


def write_synthetic_set(
    out: str | Path,
    count: int,
    seed: int,
    long_side: int = 512,
    classes: Sequence[str] = CLASSES,
    workers: int = 1,
    negative_fraction: float = 0.0,
    realistic: bool = False,
) -> Path:
    """Write a synthetic set (images/, masks/, labels.csv) and return the path of labels.csv."""
    for _ in iter_write_synthetic_set(
        out, count, seed, long_side, classes, workers, negative_fraction, realistic
    ):
        pass
    return Path(out) / "labels.csv"


def default_workers() -> int:
    """One worker per available CPU core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
