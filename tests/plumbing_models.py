"""Small networks for plumbing tests of the pipeline and ``dermpacs process``.

The weights are random, or set by hand so that the segmentation answers one label everywhere.
They are not trained: tests that use them check that photos flow through the stages and that
what is reported agrees with the mask, never that the method is skilful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dermpacs.config import Settings
from dermpacs.inference.networks import DeepLabV3Plus, build_classifier
from dermpacs.inference.weights import SEGMENTATION_CLASSES, WeightsMetadata, save_weights

CLASSES = ["atopic_dermatitis", "mycosis_fungoides", "impetigo", "herpesvirus_infection"]
LONG_SIDE = 128
CROP_SIZE = 32
VERSION = "0.0.0-plumbing"
PROVENANCE = {"data": "none: random initialisation, plumbing test"}


def plumbing_segmentation(constant_label: int | None) -> DeepLabV3Plus:
    """Random weights; with ``constant_label`` the last layer answers that label everywhere."""
    torch.manual_seed(0)
    model = DeepLabV3Plus(aspp_channels=16, decoder_channels=16, low_level_channels=8)
    if constant_label is not None:
        conv = model.classifier.conv  # type: ignore[union-attr]
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.zero_()
            conv.bias[constant_label] = 5.0
    return model.eval()


def write_plumbing_networks(folder: Path, constant_label: int | None = None) -> dict[str, Any]:
    """Save a plumbing segmentation network and classifier into ``folder``; the ``[model]``
    settings that load them on CPU."""
    folder.mkdir(parents=True, exist_ok=True)
    seg_path = folder / f"seg-{constant_label}.safetensors"
    cls_path = folder / "cls.safetensors"
    save_weights(
        plumbing_segmentation(constant_label),
        seg_path,
        WeightsMetadata(
            kind="segmentation",
            classes=SEGMENTATION_CLASSES,
            input_size=LONG_SIDE,
            version=VERSION,
            provenance=PROVENANCE,
        ),
    )
    torch.manual_seed(1)
    save_weights(
        build_classifier(len(CLASSES), widths=(8, 8, 16, 16)).eval(),
        cls_path,
        WeightsMetadata(
            kind="classifier",
            classes=tuple(CLASSES),
            input_size=CROP_SIZE,
            version=VERSION,
            provenance=PROVENANCE,
        ),
    )
    return {
        "segmentation_weights": str(seg_path),
        "classifier_weights": str(cls_path),
        "device": "cpu",
        "long_side": LONG_SIDE,
        "classes": CLASSES,
    }


def write_plumbing_models(folder: Path, constant_label: int | None) -> Settings:
    """Save a plumbing segmentation network and classifier; settings that load them on CPU."""
    return Settings.model_validate(
        {
            "storage": {"root": str(folder / "storage")},  # the ONNX export cache goes there
            "model": write_plumbing_networks(folder, constant_label),
        }
    )
