"""Evaluation of the method on an annotated set: the paper's three-way comparison, repeatable.

Every photo goes through the production path, :class:`dermpacs.inference.pipeline.Analyser`
(resize, segment, map the mask back, choose crops by the rule, classify, average). Against the
true mask and label this gives:

``segmentation``
    Dice and IoU of skin (skin and lesion together: the body surface the crop rule counts) and
    of lesion, per photo at the photo's own resolution (MONAI ``compute_dice`` / ``compute_iou``),
    then averaged over photos; also the Dice of the skin label alone (unaffected skin).
``classification.cnn_crops``
    The pipeline's own result: crops chosen on the network's mask (the whole photo when none
    qualifies).
``classification.truth_crops``
    The same rule on the true mask (:func:`~dermpacs.inference.crops.select_truth_crops`), the
    same classifier, the same averaging (the whole photo when none qualifies).
``classification.whole_image``
    The same classifier on the whole photo.

Each arm reports accuracy, per-class sensitivity, specificity and AUC (one class against the
rest), atopic dermatitis against the rest (positive when the top finding is atopic dermatitis),
and the expected calibration error (10 equal-width bins of the top probability). ``by_ita``
repeats the figures per skin-tone category, taken from the set's ``ita`` column when it has one,
else measured on the unaffected skin of the true mask. ``targets`` compares the figures with
the targets of the method's issue.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dermpacs.analysis import LESION, SKIN
from dermpacs.training.dataset import AnnotatedPhotoSet, load_pair

log = logging.getLogger(__name__)

ATOPIC_DERMATITIS = "atopic_dermatitis"
ARMS = ("cnn_crops", "truth_crops", "whole_image")
CALIBRATION_BINS = 10

# The targets of the method (issue 3), on a held-out synthetic set.
TARGET_SKIN_DICE = 0.95
TARGET_LESION_DICE = 0.85
TARGET_AD_SENSITIVITY = 0.90
TARGET_AD_SPECIFICITY = 0.90
TARGET_CROP_GAP_POINTS = 2.0
TARGET_ITA_LESION_GAP_POINTS = 5.0
# Categories with fewer photos than this are reported but not judged for the skin-tone target.
MIN_PHOTOS_PER_CATEGORY = 10


class EvaluationError(ValueError):
    """The set and the models cannot be evaluated together."""


@dataclass
class PhotoRecord:
    """What evaluation keeps of one photo."""

    name: str
    label: int
    ita_category: str | None
    skin_dice: float
    lesion_dice: float
    skin_only_dice: float
    skin_iou: float
    lesion_iou: float
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    fallback: dict[str, bool] = field(default_factory=dict)
    crops: dict[str, int] = field(default_factory=dict)


def _one_hot_regions(label_map: np.ndarray, device: torch.device) -> torch.Tensor:
    labels = torch.from_numpy(np.array(label_map, dtype=np.uint8)).to(device)
    regions = [labels > 0, labels == LESION, labels == SKIN]
    return torch.stack(regions).unsqueeze(0).float()


def segmentation_scores(
    predicted: np.ndarray, truth: np.ndarray, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Dice and IoU of one photo: skin (with lesion), lesion, and unaffected skin (Dice only).

    A region absent from both maps scores NaN (left out of averages), as MONAI does with
    ``ignore_empty``.
    """
    from monai.metrics import compute_dice, compute_iou

    if predicted.shape != truth.shape:
        raise EvaluationError(f"mask shapes differ: {predicted.shape} and {truth.shape}")
    device = torch.device(device)
    y_pred = _one_hot_regions(predicted, device)
    y = _one_hot_regions(truth, device)
    dice = compute_dice(y_pred, y, include_background=True, ignore_empty=True)[0].cpu()
    iou = compute_iou(y_pred, y, include_background=True, ignore_empty=True)[0].cpu()
    return {
        "skin_dice": float(dice[0]),
        "lesion_dice": float(dice[1]),
        "skin_only_dice": float(dice[2]),
        "skin_iou": float(iou[0]),
        "lesion_iou": float(iou[1]),
    }


def _auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    from monai.metrics import compute_roc_auc

    if positive.all() or not positive.any():
        return None
    value = compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(positive.astype(np.int64)))
    return float(np.asarray(value))


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """ECE over equal-width bins of the top probability (Guo et al., ICML 2017)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    bins = np.minimum((confidence * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    total = 0.0
    for b in range(CALIBRATION_BINS):
        members = bins == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def classification_metrics(
    probabilities: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-class sensitivity/specificity/AUC, AD against the rest, calibration."""
    if len(labels) == 0:
        return {"photos": 0}
    predicted = probabilities.argmax(axis=1)
    per_class: dict[str, Any] = {}
    for k, name in enumerate(classes):
        positive = labels == k
        called = predicted == k
        per_class[name] = {
            "photos": int(positive.sum()),
            "sensitivity": _ratio(int((called & positive).sum()), int(positive.sum())),
            "specificity": _ratio(int((~called & ~positive).sum()), int((~positive).sum())),
            "auc": _auc(probabilities[:, k], positive),
        }
    result: dict[str, Any] = {
        "photos": int(len(labels)),
        "accuracy": float((predicted == labels).mean()),
        "per_class": per_class,
        "calibration_error": expected_calibration_error(probabilities, labels),
    }
    if ATOPIC_DERMATITIS in classes:
        ad = per_class[ATOPIC_DERMATITIS]
        result["ad_vs_rest"] = {
            "sensitivity": ad["sensitivity"],
            "specificity": ad["specificity"],
            "auc": ad["auc"],
        }
    return result


def _nanmean(values: Sequence[float]) -> float | None:
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    return None if array.size == 0 else float(array.mean())


def _segmentation_summary(records: Sequence[PhotoRecord]) -> dict[str, Any]:
    return {
        "photos": len(records),
        "skin_dice": _nanmean([r.skin_dice for r in records]),
        "lesion_dice": _nanmean([r.lesion_dice for r in records]),
        "skin_only_dice": _nanmean([r.skin_only_dice for r in records]),
        "skin_iou": _nanmean([r.skin_iou for r in records]),
        "lesion_iou": _nanmean([r.lesion_iou for r in records]),
    }


def _classification_summary(
    records: Sequence[PhotoRecord], classes: Sequence[str]
) -> dict[str, Any]:
    labels = np.array([r.label for r in records], dtype=np.int64)
    summary: dict[str, Any] = {}
    for arm in ARMS:
        probabilities = np.stack([r.probabilities[arm] for r in records])
        summary[arm] = classification_metrics(probabilities, labels, classes)
        if arm != "whole_image":
            summary[arm]["whole_image_fallback_rate"] = float(
                np.mean([r.fallback[arm] for r in records])
            )
            summary[arm]["mean_crops_per_photo"] = float(np.mean([r.crops[arm] for r in records]))
    return summary


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    seg = report["segmentation"]
    cls = report["classification"]
    checks: dict[str, Any] = {}

    def at_least(value: float | None, target: float) -> bool | None:
        return None if value is None else value >= target

    checks["skin_dice"] = at_least(seg["skin_dice"], TARGET_SKIN_DICE)
    checks["lesion_dice"] = at_least(seg["lesion_dice"], TARGET_LESION_DICE)
    ad = cls["cnn_crops"].get("ad_vs_rest", {})
    checks["ad_sensitivity_cnn_crops"] = at_least(ad.get("sensitivity"), TARGET_AD_SENSITIVITY)
    checks["ad_specificity_cnn_crops"] = at_least(ad.get("specificity"), TARGET_AD_SPECIFICITY)
    cnn, truth, whole = (cls[arm]["accuracy"] for arm in ARMS)
    # "within 2 points": CNN crops at most 2 accuracy points below true-mask crops
    checks["truth_minus_cnn_crops_points"] = round(100.0 * (truth - cnn), 2)
    checks["cnn_crops_within_2_points_of_truth_crops"] = (
        100.0 * (truth - cnn) <= TARGET_CROP_GAP_POINTS
    )
    checks["cnn_crops_better_than_whole_image"] = cnn > whole
    judged = {
        name: figures["segmentation"]["lesion_dice"]
        for name, figures in report["by_ita"].items()
        if figures["photos"] >= MIN_PHOTOS_PER_CATEGORY
        and figures["segmentation"]["lesion_dice"] is not None
    }
    if judged:
        gap = 100.0 * (max(judged.values()) - min(judged.values()))
        checks["ita_lesion_dice_gap_points"] = round(gap, 2)
        checks["ita_lesion_dice_gap_within_5_points"] = gap <= TARGET_ITA_LESION_GAP_POINTS
    return checks


def _photo_ita_category(photo: Any, rgb: np.ndarray, truth: np.ndarray) -> str | None:
    from dermpacs.inference.skintone import ita_category, measure_skin_tone

    if photo.ita is not None:
        return ita_category(photo.ita)
    tone = measure_skin_tone(rgb, truth)
    return None if tone is None else tone.category


def evaluate(
    analyser: Any,
    dataset: AnnotatedPhotoSet,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the method on every photo of ``dataset`` and return the report (JSON-ready).

    Parameters
    ----------
    analyser
        A :class:`dermpacs.inference.pipeline.Analyser`.
    dataset
        An annotated set whose labels are among the analyser's classes.
    batch_size
        Photos analysed together (one segmentation batch).
    limit
        Evaluate only the first ``limit`` photos.

    Raises
    ------
    EvaluationError
        A label the classifier does not know.
    """
    from tqdm import tqdm

    from dermpacs.inference.crops import cut_crops, cut_whole_photo, select_truth_crops

    classes = tuple(analyser.classes)
    unknown = sorted({p.label for p in dataset} - set(classes))
    if unknown:
        raise EvaluationError(f"labels {unknown} are not among the classifier's {list(classes)}")
    photos = list(dataset)[: limit or None]
    crop_args = analyser.crop_settings.model_dump()
    records: list[PhotoRecord] = []
    started = time.perf_counter()
    bar = tqdm(total=len(photos), unit="photo", disable=not progress, leave=False)
    for start in range(0, len(photos), batch_size):
        chunk = photos[start : start + batch_size]
        pairs = [load_pair(p) for p in chunk]
        results = analyser.analyse_batch([rgb for rgb, _ in pairs])
        truth_crops, whole_crops, truth_counts = [], [], []
        for rgb, mask in pairs:
            windows = select_truth_crops(mask, long_side=analyser.long_side, **crop_args)
            crops = (
                cut_crops(rgb, [w.box for w in windows], analyser.crop_size)
                if windows
                else cut_whole_photo(rgb, analyser.crop_size)
            )
            truth_crops.append(crops)
            truth_counts.append(len(windows))
            whole_crops.append(cut_whole_photo(rgb, analyser.crop_size))
        truth_probabilities = analyser.classify(np.concatenate(truth_crops))
        whole_probabilities = analyser.classify(np.concatenate(whole_crops))
        offset = 0
        for index, (photo, (rgb, mask), result) in enumerate(
            zip(chunk, pairs, results, strict=True)
        ):
            n = len(truth_crops[index])
            scores = segmentation_scores(result.label_map, mask, analyser.device)
            records.append(
                PhotoRecord(
                    name=photo.name,
                    label=classes.index(photo.label),
                    ita_category=_photo_ita_category(photo, rgb, mask),
                    probabilities={
                        "cnn_crops": np.array([result.probabilities[c] for c in classes]),
                        "truth_crops": truth_probabilities[offset : offset + n].mean(axis=0),
                        "whole_image": whole_probabilities[index],
                    },
                    fallback={
                        "cnn_crops": bool(result.whole_image_fallback),
                        "truth_crops": truth_counts[index] == 0,
                    },
                    crops={"cnn_crops": len(result.crops), "truth_crops": truth_counts[index]},
                    **scores,
                )
            )
            offset += n
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - started

    report: dict[str, Any] = {
        "data": str(dataset.root),
        "photos": len(records),
        "classes": list(classes),
        "model_version": analyser.model_version,
        "device": str(analyser.device),
        "seconds": round(seconds, 1),
        "segmentation": _segmentation_summary(records),
        "classification": _classification_summary(records, classes),
        "by_ita": {},
    }
    categories = sorted({r.ita_category for r in records if r.ita_category is not None})
    for category in categories:
        members = [r for r in records if r.ita_category == category]
        report["by_ita"][category] = {
            "photos": len(members),
            "segmentation": _segmentation_summary(members),
            "classification": _classification_summary(members, classes),
        }
    report["targets"] = _targets(report)
    return _json_ready(report)


def _json_ready(value: Any) -> Any:
    """Plain JSON types; NaN becomes None."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        number = float(value)
        return None if math.isnan(number) else round(number, 6)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`evaluate`'s report."""

    def pct(value: float | None) -> str:
        return "   -  " if value is None else f"{100 * value:5.1f}%"

    seg = report["segmentation"]
    lines = [
        f"{report['photos']} photos from {report['data']} ({report['model_version']})",
        f"segmentation: skin Dice {pct(seg['skin_dice'])}  lesion Dice {pct(seg['lesion_dice'])}"
        f"  skin IoU {pct(seg['skin_iou'])}  lesion IoU {pct(seg['lesion_iou'])}",
        "classification      accuracy  AD sens  AD spec   ECE",
    ]
    for arm in ARMS:
        figures = report["classification"][arm]
        ad = figures.get("ad_vs_rest", {})
        lines.append(
            f"  {arm:<16} {pct(figures['accuracy'])}  {pct(ad.get('sensitivity'))}  "
            f"{pct(ad.get('specificity'))}  {figures['calibration_error']:.3f}"
        )
    lines.append("by ITA category     photos  skin Dice  lesion Dice  CNN-crop accuracy")
    for name, figures in report["by_ita"].items():
        lines.append(
            f"  {name:<16} {figures['photos']:6d}  {pct(figures['segmentation']['skin_dice'])}"
            f"     {pct(figures['segmentation']['lesion_dice'])}       "
            f"{pct(figures['classification']['cnn_crops']['accuracy'])}"
        )
    lines.append("targets: " + ", ".join(f"{k}={v}" for k, v in report["targets"].items()))
    return "\n".join(lines)
