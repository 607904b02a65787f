"""Evaluation: metric arithmetic, and the three arms through the production pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dermpacs.analysis import BACKGROUND, LESION, SKIN
from dermpacs.config import Settings
from dermpacs.inference.networks import DeepLabV3Plus, build_classifier
from dermpacs.inference.pipeline import Analyser
from dermpacs.inference.preprocessing import resize_label_map, resize_photo
from dermpacs.inference.weights import SEGMENTATION_CLASSES, WeightsMetadata, save_weights
from dermpacs.training.dataset import AnnotatedPhotoSet, load_pair
from dermpacs.training.evaluate import (
    EvaluationError,
    classification_metrics,
    evaluate,
    expected_calibration_error,
    segmentation_scores,
)
from dermpacs.training.synth import CLASSES, write_synthetic_set

LONG_SIDE = 96


# --------------------------------------------------------------------------- arithmetic
def test_classification_metrics_by_hand():
    classes = ("atopic_dermatitis", "impetigo")
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    labels = np.array([0, 0, 1, 1])  # the last photo is impetigo called atopic dermatitis
    figures = classification_metrics(probabilities, labels, classes)
    assert figures["accuracy"] == 0.75
    assert figures["ad_vs_rest"]["sensitivity"] == 1.0
    assert figures["ad_vs_rest"]["specificity"] == 0.5
    assert figures["per_class"]["impetigo"]["sensitivity"] == 0.5
    assert figures["per_class"]["impetigo"]["specificity"] == 1.0
    # AD scores 0.9, 0.6 against 0.3, 0.8: 3 of the 4 pairs are ordered right
    assert figures["ad_vs_rest"]["auc"] == pytest.approx(0.75)


def test_auc_is_absent_when_one_class_is_missing():
    figures = classification_metrics(np.array([[0.9, 0.1]]), np.array([0]), ("a", "b"))
    assert figures["per_class"]["a"]["auc"] is None
    assert figures["per_class"]["a"]["specificity"] is None


def test_calibration_error():
    sure_and_right = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(sure_and_right, np.array([0, 1])) == 0.0
    sure_and_wrong = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(sure_and_wrong, np.array([1, 0])) == 1.0
    # half right at confidence 0.75: |0.5 - 0.75|
    mixed = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(mixed, np.array([0, 0, 1, 1])) == pytest.approx(0.25)


def test_segmentation_scores():
    truth = np.zeros((10, 10), np.uint8)
    truth[2:8, 2:8] = SKIN
    truth[4:6, 4:6] = LESION
    same = segmentation_scores(truth, truth)
    assert same["skin_dice"] == 1.0 and same["lesion_dice"] == 1.0 and same["lesion_iou"] == 1.0
    moved = truth.copy()
    moved[4:6, 4:6] = SKIN
    moved[2:4, 2:4] = LESION
    scores = segmentation_scores(moved, truth)
    assert scores["skin_dice"] == 1.0 and scores["lesion_dice"] == 0.0
    # skin labels: 32 pixels in both, 28 shared -> 2 * 28 / 64
    assert scores["skin_only_dice"] == pytest.approx(56 / 64)
    empty = np.full((10, 10), BACKGROUND, np.uint8)
    assert np.isnan(segmentation_scores(empty, empty)["lesion_dice"])
    with pytest.raises(EvaluationError):
        segmentation_scores(empty, np.zeros((5, 5), np.uint8))


# --------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("held_out")
    write_synthetic_set(root, count=6, seed=77, long_side=LONG_SIDE)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Untrained networks: enough to test the plumbing, claimed to be nothing more."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    seg = DeepLabV3Plus(aspp_channels=16, decoder_channels=16)
    cls = build_classifier(len(CLASSES), widths=(8, 8, 8, 8))
    save_weights(
        seg,
        folder / "seg.safetensors",
        WeightsMetadata("segmentation", SEGMENTATION_CLASSES, LONG_SIDE, "test-untrained"),
    )
    save_weights(
        cls,
        folder / "cls.safetensors",
        WeightsMetadata("classifier", CLASSES, 32, "test-untrained"),
    )
    return folder / "seg.safetensors", folder / "cls.safetensors"


def _settings(weights) -> Settings:
    settings = Settings()
    settings.model.segmentation_weights = str(weights[0])
    settings.model.classifier_weights = str(weights[1])
    settings.model.long_side = LONG_SIDE
    settings.model.device = "cpu"
    settings.model.runtime = "torch"  # no ONNX export under the default storage root
    return settings


class OracleAnalyser(Analyser):
    """The production analyser with the segmentation network replaced by the true masks."""

    def __init__(self, base: Analyser, dataset: AnnotatedPhotoSet) -> None:
        super().__init__(
            base.segmentation,
            base.segmentation_metadata,
            base.classifier,
            base.classifier_metadata,
            crop_settings=base.crop_settings,
            quality_settings=base.quality_settings,
        )
        self.truth: dict[bytes, np.ndarray] = {}
        for photo in dataset:
            rgb, mask = load_pair(photo)
            small = resize_photo(rgb, self.long_side)
            self.truth[small.tobytes()] = resize_label_map(mask, small.shape[:2])

    def segment(self, photos):
        logits = []
        for photo in photos:
            labels = torch.from_numpy(self.truth[photo.tobytes()].astype(np.int64))
            logits.append(torch.nn.functional.one_hot(labels, 3).permute(2, 0, 1).float() * 10)
        return logits


def test_report_has_every_figure(held_out, weights):
    analyser = Analyser.from_settings(_settings(weights))
    dataset = AnnotatedPhotoSet(held_out, analyser.classes)
    report = evaluate(analyser, dataset, batch_size=4, progress=False)
    json.dumps(report)  # plain JSON
    assert report["photos"] == 6
    for key in ("skin_dice", "lesion_dice", "skin_iou", "lesion_iou"):
        value = report["segmentation"][key]
        assert value is None or 0.0 <= value <= 1.0
    for arm in ("cnn_crops", "truth_crops", "whole_image"):
        figures = report["classification"][arm]
        assert 0.0 <= figures["accuracy"] <= 1.0
        assert set(figures["per_class"]) == set(CLASSES)
        assert {"sensitivity", "specificity", "auc"} <= set(figures["ad_vs_rest"])
        assert 0.0 <= figures["calibration_error"] <= 1.0
    assert sum(v["photos"] for v in report["by_ita"].values()) == 6
    assert "skin_dice" in report["targets"]


def test_with_a_perfect_segmentation_cnn_crops_are_the_truth_crops(held_out, weights):
    """The evaluated path chooses crops exactly as the truth arm does when the masks agree."""
    base = Analyser.from_settings(_settings(weights))
    dataset = AnnotatedPhotoSet(held_out, base.classes)
    report = evaluate(OracleAnalyser(base, dataset), dataset, batch_size=3, progress=False)
    assert report["segmentation"]["skin_dice"] == 1.0
    assert report["segmentation"]["lesion_dice"] == 1.0
    cnn, truth = report["classification"]["cnn_crops"], report["classification"]["truth_crops"]
    assert cnn == truth
    assert report["targets"]["truth_minus_cnn_crops_points"] == 0.0


def test_unknown_labels_are_refused(held_out, weights):
    analyser = Analyser.from_settings(_settings(weights))
    dataset = AnnotatedPhotoSet(held_out)
    analyser.classifier_metadata = WeightsMetadata("classifier", ("x", "y"), 32, "v")
    with pytest.raises(EvaluationError, match="not among"):
        evaluate(analyser, dataset, progress=False)


def test_cli_prints_one_json_object(held_out, weights, capsys, monkeypatch, tmp_path):
    from dermpacs.cli import main

    monkeypatch.setenv("DERMPACS__MODEL__LONG_SIDE", str(LONG_SIDE))
    monkeypatch.setenv("DERMPACS__STORAGE__ROOT", str(tmp_path / "storage"))  # ONNX cache
    code = main(
        [
            "evaluate",
            "--data",
            str(held_out),
            "--json",
            "--segmentation-weights",
            str(weights[0]),
            "--classifier-weights",
            str(weights[1]),
            "--device",
            "cpu",
            "--limit",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["photos"] == 3
    assert set(report["classification"]) == {"cnn_crops", "truth_crops", "whole_image"}
