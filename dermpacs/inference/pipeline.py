"""The whole method on photographs: segment, choose crops, classify, measure skin tone, check.

:class:`Analyser` loads the two networks once and turns RGB photos into
:class:`~dermpacs.analysis.PhotoAnalysis` objects:

1. bring the photo to the analysis scale: long side ``model.long_side`` (aspect kept), padded to
   a multiple of 32 (:mod:`dermpacs.inference.preprocessing`). A *preview* -- the same photo
   decoded at 1/2, 1/4 or 1/8 scale by the JPEG codec (DCT scaling,
   :func:`dermpacs.imaging.decode.read_photograph`) -- is resized instead of the full photo
   when given; photos that arrive together go through the segmentation network in one batch
   per padded size;
2. take the per-pixel class at the analysis scale (for crops and skin tone) and map the mask
   back to the photo's own rows and columns: the argmax of the logits upsampled bilinearly,
   computed only along the boundaries (:func:`labels_at_shape`), so the SEG follows the
   network's evidence between pixels instead of a staircase of 8-pixel steps;
3. choose crops by the paper's rule on the analysis-scale mask (:mod:`dermpacs.inference.crops`),
   cut them from the full-resolution photo and classify them in one batch; the photo's
   probabilities are the mean of its crops' (each crop keeps its own); when no window qualifies
   the whole photo is classified and the result is flagged;
4. ITA of the unaffected skin and the quality flags.

The networks run in eager PyTorch under ``torch.inference_mode`` on the configured device
(``auto``: CUDA when available, else CPU), or in ONNX Runtime on the CPU
(``model.runtime``, :mod:`dermpacs.inference.runtime`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dermpacs.analysis import BACKGROUND, LESION, SKIN, Crop, PhotoAnalysis
from dermpacs.config import CropSettings, QualitySettings, Settings
from dermpacs.inference.batching import Batcher
from dermpacs.inference.crops import CropWindow, cut_crops, cut_whole_photo, map_box, select_crops
from dermpacs.inference.preprocessing import (
    PhotoError,
    analysis_shape,
    check_rgb,
    padded_size,
    resize_photo,
    to_crop_batch,
    to_input_batch,
)
from dermpacs.inference.quality import quality_flags, sharpness
from dermpacs.inference.runtime import ONNX_CACHE_DIRNAME, Runtime, onnx_network, resolve_runtime
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
# Reductions a preview may have: the JPEG codec's DCT scales (rounded up, as libjpeg does).
PREVIEW_REDUCTIONS = (2, 4, 8)
SEGMENTATION_WEIGHTS_FILE = "segmentation.safetensors"
CLASSIFIER_WEIGHTS_FILE = "classifier.safetensors"


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


def argmax_channels(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Index of the largest of ``C`` channels at each pixel of ``(C, rows, columns)``, as uint8.

    The same as ``logits.argmax(0)`` (first index on ties) but by ``C - 1`` element-wise
    comparisons, which read each channel plane contiguously.
    """
    array = logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else logits
    best = np.array(array[0], dtype=np.float32, copy=True)
    labels = np.zeros(best.shape, dtype=np.uint8)
    for channel in range(1, array.shape[0]):
        higher = array[channel] > best
        labels[higher] = channel
        np.maximum(best, array[channel], out=best)
    return labels


def _bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``size_out`` output positions: the two input indices and the weight of the
    second, computed in float32 as ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` does on the CPU (half-pixel centres, clamped at the first pixel)."""
    scale = np.float32(size_in / size_out)
    positions = np.arange(size_out, dtype=np.float32)
    source = np.maximum((positions + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    low = np.minimum(source.astype(np.intp), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, source - low.astype(np.float32)


def _shifted(labels: np.ndarray, axis: int) -> np.ndarray:
    """``labels`` moved by one pixel towards the start of ``axis``, the last line repeated."""
    if axis == 0:
        return np.concatenate([labels[1:], labels[-1:]], axis=0)
    return np.concatenate([labels[:, 1:], labels[:, -1:]], axis=1)


def labels_at_shape(logits: torch.Tensor | np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Labels of ``logits`` ``(C, h, w)`` at ``shape`` (rows, columns), as uint8: the argmax of
    the logits upsampled bilinearly to ``shape`` (``align_corners=False``), computed only where
    it can differ from the network-scale labels.

    A full-size pixel's bilinear value mixes the logits of the 2 x 2 network pixels around it.
    Where those four have the same argmax, so does any mix of them with non-negative weights
    (that class's logit is the largest in each, so also in their weighted sum): the label is
    theirs, and is copied block by block (``np.repeat``). Only the pixels whose four
    neighbours disagree -- a band along the boundaries, a few percent of a photo -- have their
    logits interpolated. The result equals the argmax of the upsampled logits (up to float
    rounding where two classes tie) at a fraction of the cost: no ``C x rows x columns``
    float map is made.
    """
    array = logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else logits
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"logits must have shape (C, h, w), got {array.shape}")
    small = argmax_channels(array)
    height, width = small.shape
    rows, columns = int(shape[0]), int(shape[1])
    if (height, width) == (rows, columns):
        return small
    row_low, row_high, row_weight = _bilinear_taps(height, rows)
    col_low, col_high, col_weight = _bilinear_taps(width, columns)
    # Full-size positions sharing a low tap are consecutive (the taps never decrease).
    row_repeats = np.bincount(row_low, minlength=height)
    col_repeats = np.bincount(col_low, minlength=width)
    labels = np.repeat(np.repeat(small, row_repeats, axis=0), col_repeats, axis=1)
    below = _shifted(small, 0)
    mixed = (small != below) | (small != _shifted(small, 1)) | (small != _shifted(below, 1))
    cell_rows, cell_cols = np.nonzero(mixed)
    if cell_rows.size == 0:
        return labels
    # Every full-size pixel whose low taps are a mixed cell: one small rectangle per cell.
    row_start = np.cumsum(row_repeats) - row_repeats
    col_start = np.cumsum(col_repeats) - col_repeats
    row_offsets = np.arange(int(row_repeats.max()))
    col_offsets = np.arange(int(col_repeats.max()))
    row_valid = row_offsets < row_repeats[cell_rows][:, None]
    col_valid = col_offsets < col_repeats[cell_cols][:, None]
    valid = row_valid[:, :, None] & col_valid[:, None, :]
    ys = np.broadcast_to((row_start[cell_rows][:, None] + row_offsets)[:, :, None], valid.shape)
    xs = np.broadcast_to((col_start[cell_cols][:, None] + col_offsets)[:, None, :], valid.shape)
    ys, xs = ys[valid], xs[valid]
    y0, y1, wy = row_low[ys], row_high[ys], row_weight[ys]
    x0, x1, wx = col_low[xs], col_high[xs], col_weight[xs]
    best = np.empty(ys.size, dtype=np.float32)
    refined = np.zeros(ys.size, dtype=np.uint8)
    for channel, plane in enumerate(array):
        # torch's order of operations, so that rounding agrees with F.interpolate
        top = (1 - wx) * plane[y0, x0] + wx * plane[y0, x1]
        bottom = (1 - wx) * plane[y1, x0] + wx * plane[y1, x1]
        value = (1 - wy) * top + wy * bottom
        if channel == 0:
            best[:] = value
        else:
            refined[value > best] = channel
            np.maximum(best, value, out=best)
    labels[ys, xs] = refined
    return labels


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
    runtime
        ``torch`` or ``onnx``: what ``segmentation`` and ``classifier`` are (eager modules, or
        :class:`~dermpacs.inference.runtime.OrtNetwork` sessions on the CPU). Reported only;
        :meth:`from_settings` chooses and builds them.
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
        runtime: Runtime = "torch",
        batch_size: int = 1,
        batch_wait: float = 0.02,
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
        self.runtime: Runtime = runtime
        self.segmentation = segmentation.to(self.device).eval()
        self.segmentation_metadata = segmentation_metadata
        self.classifier = classifier.to(self.device).eval()
        self.classifier_metadata = classifier_metadata
        self.crop_settings = crop_settings or CropSettings()
        self.quality_settings = quality_settings or QualitySettings()
        # batch_size > 1: concurrent analyse() calls are run together (inference.batching)
        self.batcher: Batcher[tuple[np.ndarray, np.ndarray | None], PhotoAnalysis] | None = (
            Batcher(
                self._analyse_together,
                max_size=batch_size,
                max_wait=batch_wait,
                name="dermpacs-batcher",
            )
            if batch_size > 1
            else None
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, device: str | None = None, runtime: str | None = None
    ) -> Analyser:
        """Load both weights files named by ``settings.model`` (empty: the shipped reference).

        The weights must say they are what the configuration expects: segmentation with classes
        background, skin, lesion at ``model.long_side``; a classifier with ``model.classes``.
        With the ONNX runtime (``model.runtime``, or ``runtime`` here), the verified networks
        are exported to ONNX once per set of weights into ``<storage.root>/models/onnx``
        (:func:`dermpacs.inference.runtime.onnx_network`) and run from there.

        Raises
        ------
        WeightsError
            A file missing, unreadable, altered, or not matching the configuration, or an
            ONNX export that does not reproduce PyTorch's output.
        ValueError
            An unusable ``model.device`` or ``model.runtime``.
        """
        model = settings.model
        target = resolve_device(device or model.device)
        chosen = resolve_runtime(runtime or model.runtime, target)
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
        if chosen == "onnx":
            cache = Path(settings.storage.root) / ONNX_CACHE_DIRNAME
            segmentation = onnx_network(segmentation, seg_meta, cache)
            classifier = onnx_network(classifier, cls_meta, cache)
        return cls(
            segmentation,
            seg_meta,
            classifier,
            cls_meta,
            crop_settings=settings.crops,
            quality_settings=settings.quality,
            device=target,
            runtime=chosen,
            batch_size=model.batch_size,
            batch_wait=model.batch_wait_ms / 1000.0,
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
    def analyse(self, rgb: np.ndarray, *, preview: np.ndarray | None = None) -> PhotoAnalysis:
        """Run the method on one RGB photo.

        Parameters
        ----------
        rgb
            ``(rows, columns, 3)`` uint8, the photo at full resolution: crops are cut from it
            and the label map has its shape.
        preview
            The same photo decoded at a reduced scale (``ceil(rows / k) x ceil(columns / k)``
            for k = 2, 4 or 8) whose long side is at least the analysis long side; the
            segmentation input is made from it instead of from ``rgb``.

        Raises
        ------
        PhotoError
            ``rgb`` is not an RGB photograph, or ``preview`` does not fit it.

        With a batch size above 1 (``model.batch_size``), the photo is analysed together with
        those that other threads hand in at the same time; its result is the same.
        """
        if self.batcher is not None:
            return self.batcher.submit((rgb, preview))
        return self.analyse_batch([rgb], previews=[preview])[0]

    def _analyse_together(
        self, items: Sequence[tuple[np.ndarray, np.ndarray | None]]
    ) -> list[PhotoAnalysis]:
        return self.analyse_batch([rgb for rgb, _ in items], previews=[p for _, p in items])

    def _analysis_input(self, photo: np.ndarray, preview: np.ndarray | None) -> np.ndarray:
        shape = analysis_shape(photo.shape, self.long_side)
        if preview is None:
            return resize_photo(photo, self.long_side, shape=shape)
        preview = check_rgb(preview)
        rows, columns = photo.shape[:2]
        reductions = {(-(-rows // k), -(-columns // k)) for k in PREVIEW_REDUCTIONS}
        if preview.shape[:2] not in reductions:
            raise PhotoError(
                f"a preview of a {rows} x {columns} photo must be it reduced by 2, 4 or 8 "
                f"(rounded up), got {preview.shape[:2]}"
            )
        if max(preview.shape[:2]) < self.long_side:
            raise PhotoError(
                f"a preview must have a long side of at least {self.long_side} pixels "
                f"(the analysis scale), got {preview.shape[:2]}"
            )
        return resize_photo(preview, self.long_side, shape=shape)

    def analyse_batch(
        self,
        photos: Sequence[np.ndarray],
        *,
        previews: Sequence[np.ndarray | None] | None = None,
    ) -> list[PhotoAnalysis]:
        """Run the method on photos that arrived together (one segmentation batch per padded
        size, one classification batch). ``previews``, one entry per photo (None where there
        is none), as in :meth:`analyse`. Timings of batched stages are shared equally among
        the photos.
        """
        if not photos:
            return []
        if previews is not None and len(previews) != len(photos):
            raise PhotoError("previews must have one entry per photo")
        count = len(photos)
        started = time.perf_counter()
        timings: list[dict[str, float]] = [{} for _ in photos]

        def share(stage: str, since: float) -> float:
            now = time.perf_counter()
            for t in timings:
                t[stage] = t.get(stage, 0.0) + (now - since) * 1000.0 / count
            return now

        checked = [check_rgb(p) for p in photos]
        small = [
            self._analysis_input(photo, preview)
            for photo, preview in zip(checked, previews or [None] * count, strict=True)
        ]
        mark = share("resize", started)

        logits = self.segment(small)
        mark = share("segmentation", mark)

        per_photo: list[dict[str, Any]] = []
        crop_arrays: list[np.ndarray] = []
        for index, (photo, small_photo) in enumerate(zip(checked, small, strict=True)):
            t0 = time.perf_counter()
            network_logits = logits[index].detach().cpu().numpy()
            small_labels = argmax_channels(network_logits)
            label_map = labels_at_shape(network_logits, photo.shape[:2])
            # np.bincount would widen 12 M labels to int64 first: ~20 times slower
            counts = np.array(
                [np.count_nonzero(label_map == label) for label in (BACKGROUND, SKIN, LESION)],
                dtype=np.float64,
            )
            t1 = time.perf_counter()
            windows = select_crops(
                small_labels, full_shape=photo.shape[:2], **self.crop_settings.model_dump()
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
