"""The whole method on photographs: segment, choose crops, classify, measure skin tone, check.

:class:`Analyser` loads the two networks once and turns RGB photos into
:class:`~dermpacs.analysis.PhotoAnalysis` objects:

1. resize the photo so that its long side is ``model.long_side`` (aspect kept) and pad it to a
   multiple of 32 (:mod:`dermpacs.inference.preprocessing`); photos that arrive together go
   through the segmentation network in one batch per padded size;
2. take the per-pixel class at the analysis scale (for crops and skin tone) and map the mask back
   to the photo's own rows and columns: the logits are upsampled bilinearly, then the argmax is
   taken (up to a long side of 2048; beyond, those labels are enlarged by nearest neighbour).
   That costs more than enlarging the analysis-scale labels, but the boundary follows the
   network's evidence between pixels instead of a staircase of 8-pixel steps, which would show
   in the SEG and the overlay of a 12-megapixel photo;
3. choose crops by the paper's rule on the analysis-scale mask (:mod:`dermpacs.inference.crops`),
   cut them from the full-resolution photo and classify them in one batch; the photo's
   probabilities are the mean of its crops' (each crop keeps its own); when no window qualifies
   the whole photo is classified and the result is flagged;
4. ITA of the unaffected skin and the quality flags.

Everything runs under ``torch.inference_mode`` on the configured device (``auto``: CUDA when
available, else CPU).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermpacs.analysis import LESION, SKIN, Crop, PhotoAnalysis
from dermpacs.config import CropSettings, QualitySettings, Settings
from dermpacs.inference.crops import CropWindow, cut_crops, cut_whole_photo, map_box, select_crops
from dermpacs.inference.preprocessing import (
    PhotoError,
    check_rgb,
    padded_size,
    resize_label_map,
    resize_photo,
    to_crop_batch,
    to_input_batch,
)
from dermpacs.inference.quality import quality_flags, sharpness
from dermpacs.inference.skintone import measure_skin_tone
from dermpacs.inference.versioning import combined_model_version
from dermpacs.inference.weights import (
    SEGMENTATION_CLASSES,
    WeightsError,
    WeightsMetadata,
    load_weights,
)

__all__ = [
    "ATOPIC_DERMATITIS",
    "Analyser",
    "DEFAULT_WEIGHTS_DIR",
    "PhotoError",
    "WeightsError",
    "argmax_channels",
    "labels_at_shape",
    "resolve_device",
]

ATOPIC_DERMATITIS = "atopic_dermatitis"
DEFAULT_WEIGHTS_DIR = Path(__file__).with_name("weights")
SEGMENTATION_WEIGHTS_FILE = "segmentation.safetensors"
CLASSIFIER_WEIGHTS_FILE = "classifier.safetensors"
# Long side up to which the mask is computed from bilinearly upsampled logits (see labels_at_shape).
MAX_BILINEAR_SIDE = 2048


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises
    ------
    ValueError
        An unknown name, or CUDA asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"model.device: unknown device {name!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"model.device is {name!r} but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"model.device is {name!r} but there are only "
                f"{torch.cuda.device_count()} CUDA devices"
            )
    elif device.type != "cpu":
        raise ValueError(f"model.device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def argmax_channels(logits: torch.Tensor) -> torch.Tensor:
    """Index of the largest of ``C`` channels at each pixel of ``(C, rows, columns)``, as uint8.

    The same as ``logits.argmax(0)`` (first index on ties) but by ``C - 1`` element-wise
    comparisons: torch reduces over a leading dimension of a contiguous tensor with strided
    reads, about 20 times slower on a 12-megapixel map.
    """
    best = logits[0].clone()
    labels = torch.zeros(logits.shape[1:], dtype=torch.uint8, device=logits.device)
    for channel in range(1, logits.shape[0]):
        higher = logits[channel] > best
        labels[higher] = channel
        torch.maximum(best, logits[channel], out=best)
    return labels


def labels_at_shape(
    logits: torch.Tensor, shape: Sequence[int], *, max_bilinear_side: int = MAX_BILINEAR_SIDE
) -> np.ndarray:
    """Labels of ``logits`` ``(C, h, w)`` at ``shape`` (rows, columns), as uint8.

    The logits are upsampled bilinearly and the argmax taken, up to a long side of
    ``max_bilinear_side``; a larger photo gets those labels enlarged by nearest neighbour
    (centre-aligned), so its boundary steps are at most ``long side / max_bilinear_side`` pixels
    (2 for a 12-megapixel photo). Bilinear logits all the way would cost 3 x 12 M floats and
    about 0.3 s on a 2-core CPU, for steps nobody can see at that size.
    """
    rows, columns = int(shape[0]), int(shape[1])
    if tuple(logits.shape[1:]) == (rows, columns):
        return argmax_channels(logits).cpu().numpy()
    scale = min(1.0, max_bilinear_side / max(rows, columns))
    middle = (max(1, round(rows * scale)), max(1, round(columns * scale)))
    upsampled = F.interpolate(
        logits[None].float(), size=middle, mode="bilinear", align_corners=False
    )
    labels = argmax_channels(upsampled[0]).cpu().numpy()
    return resize_label_map(labels, (rows, columns))


class Analyser:
    """The method, with both networks loaded once.

    Parameters
    ----------
    segmentation, segmentation_metadata
        The DeepLabv3+ network and what its weights file says (classes background, skin,
        lesion; ``input_size`` is the analysis long side).
    classifier, classifier_metadata
        The crop classifier and its metadata (``classes`` name the diseases; ``input_size`` is
        the crop side).
    crop_settings, quality_settings
        The crop rule and the quality thresholds.
    device
        Where the networks run; they are moved there.
    """

    def __init__(
        self,
        segmentation: nn.Module,
        segmentation_metadata: WeightsMetadata,
        classifier: nn.Module,
        classifier_metadata: WeightsMetadata,
        *,
        crop_settings: CropSettings | None = None,
        quality_settings: QualitySettings | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if segmentation_metadata.kind != "segmentation":
            raise WeightsError("the segmentation network's metadata is not of kind segmentation")
        if tuple(segmentation_metadata.classes) != SEGMENTATION_CLASSES:
            raise WeightsError(
                f"segmentation classes must be {SEGMENTATION_CLASSES}, "
                f"got {segmentation_metadata.classes}"
            )
        if classifier_metadata.kind != "classifier":
            raise WeightsError("the classifier's metadata is not of kind classifier")
        try:
            self._model_version = combined_model_version(
                segmentation_metadata.model_version, classifier_metadata.model_version
            )
        except ValueError as exc:
            raise WeightsError(str(exc)) from exc
        self.device = torch.device(device)
        self.segmentation = segmentation.to(self.device).eval()
        self.segmentation_metadata = segmentation_metadata
        self.classifier = classifier.to(self.device).eval()
        self.classifier_metadata = classifier_metadata
        self.crop_settings = crop_settings or CropSettings()
        self.quality_settings = quality_settings or QualitySettings()

    @classmethod
    def from_settings(cls, settings: Settings, *, device: str | None = None) -> Analyser:
        """Load both weights files named by ``settings.model`` (empty: the shipped reference).

        The weights must say they are what the configuration expects: segmentation with classes
        background, skin, lesion at ``model.long_side``; a classifier with ``model.classes``.

        Raises
        ------
        WeightsError
            A file missing, unreadable, altered, or not matching the configuration.
        ValueError
            An unusable ``model.device``.
        """
        model = settings.model
        target = resolve_device(device or model.device)
        seg_path = Path(
            model.segmentation_weights or DEFAULT_WEIGHTS_DIR / SEGMENTATION_WEIGHTS_FILE
        )
        cls_path = Path(model.classifier_weights or DEFAULT_WEIGHTS_DIR / CLASSIFIER_WEIGHTS_FILE)
        for path, key in ((seg_path, "segmentation_weights"), (cls_path, "classifier_weights")):
            if not path.is_file():
                raise WeightsError(
                    f"model.{key}: no weights file at {path} "
                    "(train one with `dermpacs train`, or set the path in the configuration)"
                )
        segmentation, seg_meta = load_weights(
            seg_path,
            expected={
                "kind": "segmentation",
                "classes": SEGMENTATION_CLASSES,
                "input_size": model.long_side,
            },
            device=target,
        )
        classifier, cls_meta = load_weights(
            cls_path, expected={"kind": "classifier", "classes": model.classes}, device=target
        )
        return cls(
            segmentation,
            seg_meta,
            classifier,
            cls_meta,
            crop_settings=settings.crops,
            quality_settings=settings.quality,
            device=target,
        )

    @property
    def classes(self) -> tuple[str, ...]:
        """Disease names in the classifier's output order."""
        return self.classifier_metadata.classes

    @property
    def long_side(self) -> int:
        """Long side of the analysis scale in pixels."""
        return self.segmentation_metadata.input_size

    @property
    def crop_size(self) -> int:
        """Side of the classifier's square input in pixels."""
        return self.classifier_metadata.input_size

    @property
    def model_version(self) -> str:
        """Both models' versions and digests (:mod:`dermpacs.inference.versioning`).

        Changes whenever either set of tensors changes; results are keyed on it.
        """
        return self._model_version

    # ------------------------------------------------------------------ stages
    def segment(self, photos: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Logits ``(3, h, w)`` of each photo at the analysis scale (padding removed).

        ``photos`` are already at the analysis scale (:func:`resize_photo`). Photos whose padded
        size is the same run as one batch; photos of another size (the other orientation, say)
        run in their own batch, because padding one photo to another's size would change its
        result (the image-pooling branch averages over the padding): a photo gets the same
        mask whatever arrives with it.
        """
        meta = self.segmentation_metadata
        groups: dict[tuple[int, int], list[int]] = {}
        for index, photo in enumerate(photos):
            key = (padded_size(photo.shape[0]), padded_size(photo.shape[1]))
            groups.setdefault(key, []).append(index)
        results: list[torch.Tensor | None] = [None] * len(photos)
        for indices in groups.values():
            batch = to_input_batch([photos[i] for i in indices], meta.mean, meta.std)
            with torch.inference_mode():
                logits = self.segmentation(batch.to(self.device))
            for position, index in enumerate(indices):
                rows, columns = photos[index].shape[:2]
                results[index] = logits[position, :, :rows, :columns]
        return [r for r in results if r is not None]

    def classify(self, crops: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, classes)`` of square uint8 crops ``(N, S, S, 3)``."""
        if len(crops) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float64)
        meta = self.classifier_metadata
        batch = to_crop_batch(crops, meta.mean, meta.std).to(self.device)
        with torch.inference_mode():
            probabilities = torch.softmax(self.classifier(batch).float(), dim=1)
        return probabilities.cpu().numpy().astype(np.float64)

    # ------------------------------------------------------------------ the method
    def analyse(
        self, rgb: np.ndarray, *, source_shape: Sequence[int] | None = None
    ) -> PhotoAnalysis:
        """Run the method on one RGB photo.

        Parameters
        ----------
        rgb
            ``(rows, columns, 3)`` uint8.
        source_shape
            Rows and columns of the source image when ``rgb`` was decoded at a reduced scale;
            the label map and the crop boxes are then given in source pixels. By default the
            photo's own.

        Raises
        ------
        PhotoError
            ``rgb`` is not an RGB photograph.
        """
        shapes = None if source_shape is None else [source_shape]
        return self.analyse_batch([rgb], source_shapes=shapes)[0]

    def analyse_batch(
        self,
        photos: Sequence[np.ndarray],
        *,
        source_shapes: Sequence[Sequence[int] | None] | None = None,
    ) -> list[PhotoAnalysis]:
        """Run the method on photos that arrived together (one segmentation batch, one
        classification batch). Timings of batched stages are shared equally among the photos.
        """
        if not photos:
            return []
        if source_shapes is not None and len(source_shapes) != len(photos):
            raise PhotoError("source_shapes must have one entry per photo")
        count = len(photos)
        started = time.perf_counter()
        timings: list[dict[str, float]] = [{} for _ in photos]

        def share(stage: str, since: float) -> float:
            now = time.perf_counter()
            for t in timings:
                t[stage] = t.get(stage, 0.0) + (now - since) * 1000.0 / count
            return now

        checked = [check_rgb(p) for p in photos]
        targets = [
            tuple(int(v) for v in (s if s is not None else p.shape[:2]))
            for p, s in zip(checked, source_shapes or [None] * count, strict=True)
        ]
        small = [resize_photo(p, self.long_side) for p in checked]
        mark = share("resize", started)

        logits = self.segment(small)
        mark = share("segmentation", mark)

        per_photo: list[dict[str, Any]] = []
        crop_arrays: list[np.ndarray] = []
        for index, (photo, small_photo, target) in enumerate(
            zip(checked, small, targets, strict=True)
        ):
            t0 = time.perf_counter()
            small_labels = argmax_channels(logits[index]).cpu().numpy()
            label_map = labels_at_shape(logits[index], target)
            counts = np.bincount(label_map.ravel(), minlength=3).astype(np.float64)
            t1 = time.perf_counter()
            windows = select_crops(
                small_labels, full_shape=target, **self.crop_settings.model_dump()
            )
            if windows:
                boxes = [
                    map_box(w.analysis_box, small_labels.shape, photo.shape[:2]) for w in windows
                ]
                crops = cut_crops(photo, boxes, self.crop_size)
            else:
                crops = cut_whole_photo(photo, self.crop_size)
            crop_arrays.append(crops)
            t2 = time.perf_counter()
            tone = measure_skin_tone(small_photo, small_labels)
            t3 = time.perf_counter()
            photo_sharpness = sharpness(small_photo)
            t4 = time.perf_counter()
            timings[index]["mask"] = (t1 - t0) * 1000.0
            timings[index]["crops"] = (t2 - t1) * 1000.0
            timings[index]["skin_tone"] = (t3 - t2) * 1000.0
            timings[index]["quality"] = (t4 - t3) * 1000.0
            per_photo.append(
                {
                    "label_map": label_map,
                    "counts": counts,
                    "windows": windows,
                    "tone": tone,
                    "sharpness": photo_sharpness,
                }
            )
        mark = time.perf_counter()

        probabilities = self.classify(np.concatenate(crop_arrays))
        mark = share("classification", mark)

        results: list[PhotoAnalysis] = []
        offset = 0
        for index, item in enumerate(per_photo):
            n = len(crop_arrays[index])
            crop_probabilities = probabilities[offset : offset + n]
            offset += n
            results.append(self._result(item, crop_probabilities, timings[index]))
        total = (time.perf_counter() - started) * 1000.0 / count
        for result in results:
            result.timings_ms["total"] = total
        return results

    def _result(
        self, item: dict[str, Any], crop_probabilities: np.ndarray, timings: dict[str, float]
    ) -> PhotoAnalysis:
        counts: np.ndarray = item["counts"]
        windows: list[CropWindow] = item["windows"]
        pixels = float(counts.sum())
        skin_pixels = float(counts[SKIN] + counts[LESION])  # lesion counts as skin
        lesion_pixels = float(counts[LESION])
        mean = crop_probabilities.mean(axis=0)
        probabilities = {name: float(p) for name, p in zip(self.classes, mean, strict=True)}
        crops = tuple(
            Crop(
                box=w.box,
                skin_fraction=w.skin_fraction,
                lesion_fraction=w.lesion_fraction,
                probabilities={name: float(p) for name, p in zip(self.classes, row, strict=True)},
            )
            for w, row in zip(windows, crop_probabilities, strict=False)
        )  # with no window, the one row is the whole photo's and no Crop is reported
        skin_fraction = skin_pixels / pixels
        flags = quality_flags(
            skin_fraction=skin_fraction,
            has_qualifying_crop=bool(windows),
            sharpness=item["sharpness"],
            settings=self.quality_settings,
        )
        tone = item["tone"]
        return PhotoAnalysis(
            label_map=item["label_map"],
            skin_fraction=skin_fraction,
            lesion_fraction=lesion_pixels / pixels,
            lesion_fraction_of_skin=lesion_pixels / skin_pixels if skin_pixels else 0.0,
            crops=crops,
            probabilities=probabilities,
            finding=self.classes[int(np.argmax(mean))],
            atopic_dermatitis_probability=probabilities.get(ATOPIC_DERMATITIS, 0.0),
            ita_degrees=None if tone is None else tone.ita_degrees,
            ita_category=None if tone is None else tone.category,
            quality_flags=flags,
            whole_image_fallback=not windows,
            model_version=self.model_version,
            timings_ms=dict(timings),
        )
