"""Weights files: safetensors with metadata, digest and configuration checks.

The models here are small and randomly initialised: these test the file format, not skill.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dermpacs.inference.networks import DeepLabV3Plus, build_classifier
from dermpacs.inference.weights import (
    SEGMENTATION_CLASSES,
    WeightsError,
    WeightsMetadata,
    load_weights,
    read_metadata,
    save_weights,
)

CLASSES = ("atopic_dermatitis", "mycosis_fungoides", "impetigo", "herpesvirus_infection")


def _segmentation(tmp_path: Path) -> tuple[DeepLabV3Plus, Path, WeightsMetadata]:
    model = DeepLabV3Plus(aspp_channels=16, decoder_channels=16, low_level_channels=8).eval()
    path = tmp_path / "segmentation.safetensors"
    metadata = save_weights(
        model,
        path,
        WeightsMetadata(
            kind="segmentation",
            classes=SEGMENTATION_CLASSES,
            input_size=256,
            version="0.0.1-test",
            provenance={"seed": 1, "data": "none: random initialisation for a plumbing test"},
        ),
    )
    return model, path, metadata


def test_round_trip_gives_the_same_network(tmp_path: Path) -> None:
    model, path, written = _segmentation(tmp_path)
    loaded, metadata = load_weights(
        path, expected={"kind": "segmentation", "classes": list(SEGMENTATION_CLASSES)}
    )
    assert metadata == written
    assert metadata.architecture == "deeplabv3plus"
    assert len(metadata.payload_sha256) == 64
    assert metadata.model_version == f"0.0.1-test+{metadata.payload_sha256[:8]}"
    assert not loaded.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert read_metadata(path) == written


def test_file_is_safetensors_with_json_header(tmp_path: Path) -> None:
    _, path, _ = _segmentation(tmp_path)
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_length])
    meta = header["__metadata__"]
    assert json.loads(meta["kind"]) == "segmentation"
    assert json.loads(meta["classes"]) == list(SEGMENTATION_CLASSES)
    assert json.loads(meta["format"]) == "dermpacs-weights/1"
    assert json.loads(meta["provenance"])["seed"] == 1


def test_altered_tensors_are_refused(tmp_path: Path) -> None:
    _, path, _ = _segmentation(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # one byte of the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="sha256"):
        load_weights(path)


@pytest.mark.parametrize(
    ("expected", "key"),
    [
        ({"kind": "classifier"}, "kind"),
        ({"classes": ["background", "lesion", "skin"]}, "classes"),
        ({"input_size": 512}, "input_size"),
    ],
)
def test_metadata_that_differs_from_the_configuration_is_refused(
    tmp_path: Path, expected: dict[str, object], key: str
) -> None:
    _, path, _ = _segmentation(tmp_path)
    with pytest.raises(WeightsError, match=key):
        load_weights(path, expected=expected)


def test_classifier_round_trip_and_class_count(tmp_path: Path) -> None:
    model = build_classifier(len(CLASSES), widths=(8, 8, 16, 16)).eval()
    path = tmp_path / "classifier.safetensors"
    meta = WeightsMetadata(kind="classifier", classes=CLASSES, input_size=64, version="t")
    save_weights(model, path, meta)
    loaded, metadata = load_weights(path, expected={"kind": "classifier", "classes": CLASSES})
    assert metadata.architecture_args["widths"] == [8, 8, 16, 16]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(WeightsError, match="outputs"):
        save_weights(
            model,
            tmp_path / "bad.safetensors",
            meta.__class__(**{**meta.__dict__, "classes": CLASSES[:3]}),
        )


def test_files_that_are_not_dermpacs_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsError):
        load_weights(tmp_path / "missing.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(WeightsError, match="metadata"):
        load_weights(bare)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(WeightsError):
        load_weights(junk)


def test_metadata_is_validated() -> None:
    with pytest.raises(WeightsError):
        WeightsMetadata(kind="other", classes=("a", "b"), input_size=64, version="1")  # type: ignore[arg-type]
    with pytest.raises(WeightsError):
        WeightsMetadata(kind="classifier", classes=("a", "a"), input_size=64, version="1")
    with pytest.raises(WeightsError):
        WeightsMetadata(kind="classifier", classes=("a", "b"), input_size=64, version="")
