"""A small PNG of a job's burned-in overlay, for its page.

The overlay Secondary Capture is the one result object a person can read at a glance; it is
decoded from the file the worker wrote and scaled down. Only pixels leave the file, none of its
header (no patient data is sent to the browser).
"""

from __future__ import annotations

import io
from pathlib import Path

THUMBNAIL_LONG_SIDE = 480


class ThumbnailError(RuntimeError):
    """The overlay cannot be shown (missing file, pixels that do not decode)."""


def overlay_thumbnail(path: str | Path, *, long_side: int = THUMBNAIL_LONG_SIDE) -> bytes:
    """PNG bytes of the image in the DICOM file at ``path``, at most ``long_side`` pixels.

    Raises
    ------
    ThumbnailError
        The file is missing or its pixels cannot be decoded.
    """
    import numpy as np
    from PIL import Image
    from pydicom import dcmread
    from pydicom.pixels import apply_color_lut, pixel_array

    try:
        dataset = dcmread(path)
        # The first frame; YCbCr comes back as RGB (raw=False).
        pixels = pixel_array(dataset, index=0 if "NumberOfFrames" in dataset else None)
    except FileNotFoundError as exc:
        raise ThumbnailError(f"no overlay file at {path}") from exc
    except Exception as exc:
        raise ThumbnailError(f"the overlay does not decode: {type(exc).__name__}: {exc}") from exc
    photometric = str(dataset.get("PhotometricInterpretation", "RGB"))
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, dataset)
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        array = ((array.astype(np.float64) - low) * scale).astype(np.uint8)
    if photometric == "MONOCHROME1":
        array = 255 - array
    image = Image.fromarray(array)
    image.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
