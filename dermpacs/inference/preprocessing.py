"""The analysis scale: how a photo becomes the segmentation network's input, and back.

Shared by inference and training so that both see photos the same way: the photo is resized
(aspect kept) so that its long side is ``long_side`` pixels, normalised per channel, and padded at
the bottom and right to a multiple of 32 with zeros in normalised units (the mean colour).
Training pads its masks with background over the same area.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# Sizes that are multiples of 32 keep every encoder feature map aligned with the input.
PAD_MULTIPLE = 32


class PhotoError(ValueError):
    """The array is not an RGB photograph the method can analyse."""


def check_rgb(rgb: np.ndarray) -> np.ndarray:
    """Return ``rgb`` as a C-contiguous ``uint8`` array of shape ``(rows, columns, 3)``.

    Raises
    ------
    PhotoError
        Wrong shape or dtype, or an empty image.
    """
    if not isinstance(rgb, np.ndarray):
        raise PhotoError(f"a photo must be a numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise PhotoError(f"a photo must have shape (rows, columns, 3), got {rgb.shape}")
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise PhotoError(f"a photo must be at least 2 x 2 pixels, got {rgb.shape[:2]}")
    if rgb.dtype != np.uint8:
        raise PhotoError(f"a photo must be uint8 RGB, got {rgb.dtype}")
    return np.ascontiguousarray(rgb)


def analysis_shape(shape: Sequence[int], long_side: int) -> tuple[int, int]:
    """Rows and columns of a photo of ``shape`` resized so that its long side is ``long_side``."""
    rows, columns = int(shape[0]), int(shape[1])
    scale = long_side / max(rows, columns)
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def resize_photo(
    rgb: np.ndarray, long_side: int, *, shape: Sequence[int] | None = None
) -> np.ndarray:
    """The photo at the analysis scale (bilinear, antialiased when reducing).

    ``shape`` (rows, columns) overrides the size computed from ``rgb``'s own: a preview decoded
    at reduced scale is brought to the analysis shape of the full photo it stands for, so that
    both give the network inputs of the same size.
    """
    rgb = check_rgb(rgb)
    rows, columns = analysis_shape(rgb.shape, long_side) if shape is None else shape
    if (rows, columns) == rgb.shape[:2]:
        return rgb
    image = Image.fromarray(rgb)
    # reducing_gap: PIL first shrinks by an integer factor in the box filter, then resamples;
    # much faster on 12-megapixel photos and visually identical at this gap.
    resized = image.resize((columns, rows), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(resized)


def resize_label_map(label_map: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A label map resized to ``shape`` (rows, columns) by nearest neighbour; labels stay labels."""
    rows, columns = int(shape[0]), int(shape[1])
    if label_map.shape == (rows, columns):
        return label_map.astype(np.uint8, copy=False)
    image = Image.fromarray(label_map.astype(np.uint8, copy=False))
    return np.asarray(image.resize((columns, rows), Image.Resampling.NEAREST))


def padded_size(size: int, multiple: int = PAD_MULTIPLE) -> int:
    """``size`` rounded up to a multiple of ``multiple``."""
    return -(-size // multiple) * multiple


def to_input_batch(
    photos: Sequence[np.ndarray],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    multiple: int = PAD_MULTIPLE,
) -> torch.Tensor:
    """Normalise and pad photos at the analysis scale into one ``(N, 3, H, W)`` float tensor.

    ``H`` and ``W`` are the largest rows and columns among the photos rounded up to ``multiple``;
    each photo sits at the top left, the rest is zero (the mean colour after normalisation).
    """
    if not photos:
        raise PhotoError("no photos to batch")
    rows = padded_size(max(p.shape[0] for p in photos), multiple)
    columns = padded_size(max(p.shape[1] for p in photos), multiple)
    batch = torch.zeros((len(photos), 3, rows, columns), dtype=torch.float32)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    for index, photo in enumerate(photos):
        # np.require copies only read-only arrays (PIL's), which torch will not wrap
        writable = np.require(photo, np.uint8, ["C", "W"])
        pixels = torch.from_numpy(writable).permute(2, 0, 1).float() / 255.0
        h, w = photo.shape[:2]
        batch[index, :, :h, :w] = (pixels - mean_t) / std_t
    return batch


def to_crop_batch(
    crops: np.ndarray | Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Normalise square crops ``(N, S, S, 3)`` uint8 into a ``(N, 3, S, S)`` float tensor."""
    stacked = crops if isinstance(crops, np.ndarray) else np.stack(list(crops))
    array = np.require(stacked, np.uint8, ["C", "W"])
    if array.ndim != 4 or array.shape[3] != 3:
        raise PhotoError(f"crops must have shape (N, S, S, 3), got {array.shape}")
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t
