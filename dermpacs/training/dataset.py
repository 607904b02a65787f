"""Annotated photo sets on disk: the folder layout used for training and evaluation.

A set is a folder with::

    images/    the photographs (PNG or JPEG, RGB; any size, one per file)
    masks/     one PNG per photo, named after the photo's stem: 0 background, 1 skin, 2 lesion
    labels.csv a header row, then one row per photo; columns ``image`` (the file name under
               images/) and ``label`` (a class name) are required, ``ita`` (ITA° of the skin)
               is optional, any other column is kept as it is

``dermpacs synth`` writes this layout; a hospital brings its own annotated photos in the same
one (docs/training.md).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps

from dermpacs.analysis import LESION

REQUIRED_COLUMNS = ("image", "label")
Item = TypeVar("Item")
Result = TypeVar("Result")


class DatasetError(ValueError):
    """A folder that does not follow the annotated-set layout; the message says where."""


@dataclass(frozen=True)
class AnnotatedPhoto:
    """One row of ``labels.csv`` with the paths of its photo and mask."""

    name: str
    image_path: Path
    mask_path: Path
    label: str
    ita: float | None = None
    columns: dict[str, str] = field(default_factory=dict)


def _parse_ita(raw: str | None, where: str) -> float | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError as exc:
        raise DatasetError(f"{where}: ita {raw!r} is not a number") from exc
    if not math.isfinite(value) or not -90.0 <= value <= 90.0:
        raise DatasetError(f"{where}: ita {value} is outside -90..90 degrees")
    return value


class AnnotatedPhotoSet(Sequence[AnnotatedPhoto]):
    """The photos of an annotated set, checked when opened.

    Parameters
    ----------
    root
        The folder holding images/, masks/ and labels.csv.
    classes
        When given, every label must be one of them.

    Raises
    ------
    DatasetError
        Missing labels.csv or columns, a photo or mask file that does not exist, an unknown
        label, a repeated image name, or an empty set.
    """

    def __init__(self, root: str | Path, classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        labels = self.root / "labels.csv"
        if not labels.is_file():
            raise DatasetError(f"{self.root}: no labels.csv (see docs/training.md for the layout)")
        with open(labels, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise DatasetError(f"{labels}: missing columns {missing}; header is {header}")
            rows = list(reader)
        if not rows:
            raise DatasetError(f"{labels}: no photos listed")
        photos: list[AnnotatedPhoto] = []
        seen: set[str] = set()
        for line, row in enumerate(rows, start=2):
            where = f"{labels}:{line}"
            name = (row.get("image") or "").strip()
            label = (row.get("label") or "").strip()
            if not name or not label:
                raise DatasetError(f"{where}: empty image or label")
            if name in seen:
                raise DatasetError(f"{where}: image {name!r} listed twice")
            seen.add(name)
            if classes is not None and label not in classes:
                raise DatasetError(f"{where}: label {label!r} is not one of {list(classes)}")
            image_path = self.root / "images" / name
            mask_path = self.root / "masks" / (Path(name).stem + ".png")
            if not image_path.is_file():
                raise DatasetError(f"{where}: photo {image_path} does not exist")
            if not mask_path.is_file():
                raise DatasetError(f"{where}: mask {mask_path} does not exist")
            photos.append(
                AnnotatedPhoto(
                    name=name,
                    image_path=image_path,
                    mask_path=mask_path,
                    label=label,
                    ita=_parse_ita(row.get("ita"), where),
                    columns={k: v for k, v in row.items() if k is not None},
                )
            )
        self.photos: tuple[AnnotatedPhoto, ...] = tuple(photos)
        self.classes: tuple[str, ...] = (
            tuple(classes) if classes is not None else tuple(sorted({p.label for p in photos}))
        )

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, index: int) -> AnnotatedPhoto:  # type: ignore[override]
        return self.photos[index]

    def __iter__(self) -> Iterator[AnnotatedPhoto]:
        return iter(self.photos)

    def label_index(self, photo: AnnotatedPhoto) -> int:
        """Position of the photo's label in :attr:`classes`."""
        return self.classes.index(photo.label)


def load_photo(photo: AnnotatedPhoto) -> np.ndarray:
    """The photo as ``(rows, columns, 3)`` uint8 RGB, turned upright by its EXIF orientation.

    Raises
    ------
    DatasetError
        The file cannot be decoded.
    """
    try:
        with Image.open(photo.image_path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except OSError as exc:
        raise DatasetError(f"{photo.image_path}: cannot read the photo: {exc}") from exc


def load_mask(photo: AnnotatedPhoto, shape: Sequence[int] | None = None) -> np.ndarray:
    """The label map as ``(rows, columns)`` uint8 with values 0, 1, 2.

    Parameters
    ----------
    shape
        When given, the photo's rows and columns, which the mask must have.

    Raises
    ------
    DatasetError
        Unreadable mask, more than one channel, a value other than 0, 1, 2, or a size that
        differs from the photo's.
    """
    try:
        with Image.open(photo.mask_path) as image:
            if image.mode not in ("L", "P", "I", "I;16", "1"):
                raise DatasetError(
                    f"{photo.mask_path}: a mask must have one channel of labels, got {image.mode}"
                )
            mask = np.asarray(image)
    except OSError as exc:
        raise DatasetError(f"{photo.mask_path}: cannot read the mask: {exc}") from exc
    if mask.ndim != 2:
        raise DatasetError(f"{photo.mask_path}: a mask must be 2-D, got shape {mask.shape}")
    if mask.size and int(mask.max()) > LESION:
        values = sorted(int(v) for v in np.unique(mask))[:8]
        raise DatasetError(
            f"{photo.mask_path}: labels must be 0 background, 1 skin, 2 lesion; found {values}"
        )
    if shape is not None and tuple(mask.shape) != (int(shape[0]), int(shape[1])):
        raise DatasetError(
            f"{photo.mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but the photo is "
            f"{shape[0]}x{shape[1]}"
        )
    return mask.astype(np.uint8, copy=False)


def load_pair(photo: AnnotatedPhoto) -> tuple[np.ndarray, np.ndarray]:
    """The photo and its checked mask."""
    rgb = load_photo(photo)
    return rgb, load_mask(photo, rgb.shape[:2])


def map_photos(
    function: Callable[[Item], Result], items: Sequence[Item], workers: int = 1
) -> Iterator[Result]:
    """``function(item)`` for each item, in order, in ``workers`` processes when above one."""
    if workers <= 1 or len(items) < 2:
        for item in items:
            yield function(item)
        return
    chunk = max(1, len(items) // (workers * 8))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(function, items, chunksize=chunk)
