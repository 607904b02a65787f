"""Which networks the benchmarks run: the shipped reference weights, or untrained stand-ins.

Speed depends on the architecture and the input size, not on the values of the weights, so
until the reference weights ship the benchmarks time networks of the same architecture
(:class:`~dermpacs.inference.networks.DeepLabV3Plus` with its defaults, the default crop
classifier, analysis long side 512, crops of 128) with random weights. Every result says which
it used; findings from untrained networks mean nothing, and crop counts (hence classification
time) follow whatever the random segmentation answers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.inputs import CACHE

# Short: model_version "seg-<v>+<sha12>/cls-<v>+<sha12>" goes into LO elements (64 characters).
UNTRAINED_VERSION = "0.0.0-random"
UNTRAINED_LONG_SIDE = 512
UNTRAINED_CROP_SIZE = 128


@dataclass(frozen=True)
class ModelChoice:
    """The ``[model]`` settings to use and what they are."""

    section: dict[str, Any]
    trained: bool
    description: str


def shipped_weights_present() -> bool:
    from dermpacs.config import Settings
    from dermpacs.processing import weights_paths

    return all(path.is_file() for path in weights_paths(Settings()))


def choose_model(cache: Path = CACHE) -> ModelChoice:
    """The shipped reference weights when present, else untrained reference-architecture ones.

    ``DERMPACS_BENCH_MODEL=untrained`` forces the untrained stand-ins (``shipped`` requires
    the reference weights).
    """
    wanted = os.environ.get("DERMPACS_BENCH_MODEL", "auto")
    if wanted not in ("auto", "shipped", "untrained"):
        raise ValueError(f"DERMPACS_BENCH_MODEL must be auto, shipped or untrained, not {wanted!r}")
    if wanted == "shipped" and not shipped_weights_present():
        raise FileNotFoundError("DERMPACS_BENCH_MODEL=shipped but no reference weights ship")
    if wanted != "untrained" and shipped_weights_present():
        from dermpacs.config import Settings
        from dermpacs.processing import model_version

        return ModelChoice({}, True, f"shipped reference weights {model_version(Settings())}")
    folder = cache / "untrained-weights"
    seg, cls = folder / "segmentation.safetensors", folder / "classifier.safetensors"
    from dermpacs.config import ModelSettings

    classes = list(ModelSettings().classes)
    if not (seg.is_file() and cls.is_file()):
        _write_untrained(folder, classes)
    section = {
        "segmentation_weights": str(seg),
        "classifier_weights": str(cls),
        "long_side": UNTRAINED_LONG_SIDE,
        "classes": classes,
        "device": "cpu",
    }
    why = (
        "chosen by DERMPACS_BENCH_MODEL=untrained"
        if wanted == "untrained"
        else "the reference weights had not shipped"
    )
    return ModelChoice(
        section,
        False,
        "UNTRAINED weights of the reference architecture (DeepLabV3Plus efficientnet-b0 "
        f"defaults at long side {UNTRAINED_LONG_SIDE}; default crop classifier at "
        f"{UNTRAINED_CROP_SIZE} px): timings only, {why}",
    )


def _write_untrained(folder: Path, classes: list[str]) -> None:
    import torch

    from dermpacs.inference.networks import DeepLabV3Plus, build_classifier
    from dermpacs.inference.weights import SEGMENTATION_CLASSES, WeightsMetadata, save_weights

    folder.mkdir(parents=True, exist_ok=True)
    provenance = {"data": "none: random initialisation, benchmark timing only"}
    torch.manual_seed(0)
    save_weights(
        DeepLabV3Plus(out_channels=len(SEGMENTATION_CLASSES)).eval(),
        folder / "segmentation.safetensors",
        WeightsMetadata(
            kind="segmentation",
            classes=SEGMENTATION_CLASSES,
            input_size=UNTRAINED_LONG_SIDE,
            version=UNTRAINED_VERSION,
            provenance=provenance,
        ),
    )
    torch.manual_seed(1)
    save_weights(
        build_classifier(len(classes)).eval(),
        folder / "classifier.safetensors",
        WeightsMetadata(
            kind="classifier",
            classes=tuple(classes),
            input_size=UNTRAINED_CROP_SIZE,
            version=UNTRAINED_VERSION,
            provenance=provenance,
        ),
    )
