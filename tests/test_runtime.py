"""Where the networks run (model.runtime) and what the fast path changes in the results.

* The ONNX export is made from the verified weights at first use, kept under
  ``storage.root/models/onnx`` by the weights' SHA-256, written atomically, reused, made again
  when the weights change (even under the same file name) or when the cached file is broken,
  and refused when it does not reproduce PyTorch.
* Eager PyTorch, ONNX Runtime, and ONNX Runtime with the segmentation input taken from the
  codec's reduced-scale decode (the worker's path) agree within the tolerances stated in
  docs/model-card.md, on generated clinical photos with the shipped weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dermpacs.config import ConfigError, Settings, load_settings
from dermpacs.imaging.decode import read_photograph
from dermpacs.inference import runtime
from dermpacs.inference.pipeline import Analyser, WeightsError
from dermpacs.inference.runtime import OrtNetwork, resolve_runtime
from dermpacs.inference.weights import read_metadata
from tests.photos import PHOTO_KINDS_BY_NAME
from tests.plumbing_models import write_plumbing_models

# Stated in docs/model-card.md ("Runtimes and the fast path").
ONNX_LABEL_AGREEMENT = 0.9999
ONNX_PROBABILITY_DIFF = 1e-4
PREVIEW_LABEL_AGREEMENT = 0.995
PREVIEW_PROBABILITY_DIFF = 0.02


def _cache(settings: Settings) -> Path:
    return Path(settings.storage.root) / runtime.ONNX_CACHE_DIRNAME


def test_runtime_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime("auto", cpu) == "onnx"
    assert resolve_runtime("auto", cuda) == "torch"
    assert resolve_runtime("torch", cpu) == "torch"
    assert resolve_runtime("onnx", cpu) == "onnx"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_runtime("onnx", cuda)
    with pytest.raises(ValueError, match="model.runtime"):
        resolve_runtime("tensorrt", cpu)
    with pytest.raises(ConfigError, match="runtime"):
        load_settings(environ={"DERMPACS__MODEL__RUNTIME": "tensorrt"})
    monkeypatch.setattr(runtime, "onnxruntime_available", lambda: False)
    assert resolve_runtime("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="does not import"):
        resolve_runtime("onnx", cpu)


def test_onnx_export_is_cached_by_the_weights_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = write_plumbing_models(tmp_path, None)
    analyser = Analyser.from_settings(settings)  # auto on the CPU: ONNX Runtime
    assert analyser.runtime == "onnx"
    assert isinstance(analyser.segmentation, OrtNetwork)
    assert isinstance(analyser.classifier, OrtNetwork)
    files = sorted(p.name for p in _cache(settings).iterdir())
    seg_meta = read_metadata(settings.model.segmentation_weights)
    cls_meta = read_metadata(settings.model.classifier_weights)
    assert files == sorted(
        runtime.cached_onnx_path(m, _cache(settings)).name for m in (seg_meta, cls_meta)
    )  # no temporary file left behind
    stamps = {p: p.stat().st_mtime_ns for p in _cache(settings).iterdir()}

    # A second process (here: a second load) reuses the files and exports nothing.
    def no_export(*args: object, **kwargs: object) -> Path:
        raise AssertionError("exported again")

    monkeypatch.setattr(runtime, "export_onnx", no_export)
    again = Analyser.from_settings(settings)
    assert {p: p.stat().st_mtime_ns for p in _cache(settings).iterdir()} == stamps
    photo = np.full((150, 200, 3), (200, 150, 125), dtype=np.uint8)
    assert again.analyse(photo).probabilities == analyser.analyse(photo).probabilities
    monkeypatch.undo()

    # Other weights under the same file name: another key, another file; the old one stays.
    seg_path = Path(settings.model.segmentation_weights)
    replaced = write_plumbing_models(tmp_path / "other", 2)
    os.replace(replaced.model.segmentation_weights, seg_path)
    Analyser.from_settings(settings)
    names = {p.name for p in _cache(settings).iterdir()}
    assert len(names) == 3
    assert runtime.cached_onnx_path(read_metadata(seg_path), _cache(settings)).name in names


def test_broken_cached_file_is_exported_again(tmp_path: Path) -> None:
    settings = write_plumbing_models(tmp_path, None)
    Analyser.from_settings(settings, runtime="onnx")
    meta = read_metadata(settings.model.segmentation_weights)
    path = runtime.cached_onnx_path(meta, _cache(settings))
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    analyser = Analyser.from_settings(settings, runtime="onnx")
    assert path.stat().st_size > 100
    assert analyser.analyse(np.zeros((64, 64, 3), dtype=np.uint8)).label_map.shape == (64, 64)


def test_export_that_does_not_reproduce_torch_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = write_plumbing_models(tmp_path, None)
    monkeypatch.setattr(runtime, "EXPORT_ATOL", -1.0)  # no output can be that close
    monkeypatch.setattr(runtime, "EXPORT_RTOL", 0.0)
    with pytest.raises(WeightsError, match="differs from PyTorch"):
        Analyser.from_settings(settings, runtime="onnx")
    assert not _cache(settings).exists() or not any(_cache(settings).iterdir())


def test_torch_runtime_keeps_eager_modules(tmp_path: Path) -> None:
    settings = write_plumbing_models(tmp_path, None)
    analyser = Analyser.from_settings(settings, runtime="torch")
    assert analyser.runtime == "torch"
    assert isinstance(analyser.segmentation, torch.nn.Module)
    assert not isinstance(analyser.segmentation, OrtNetwork)
    assert not _cache(settings).exists()


@pytest.mark.slow
def test_torch_onnx_and_preview_paths_agree(tmp_path: Path) -> None:
    """Shipped weights, generated clinical photos as camera JPEGs: eager PyTorch on the full
    decode (the old worker), ONNX Runtime on the full decode, and ONNX Runtime with the
    segmentation input from the codec's 1/4-scale decode (model.reduced_decode)."""
    from dermpacs.training.synth import generate_photo

    settings = Settings.model_validate({"storage": {"root": str(tmp_path)}})
    eager = Analyser.from_settings(settings, runtime="torch")
    onnx = Analyser.from_settings(settings, runtime="onnx")
    kind = PHOTO_KINDS_BY_NAME["vlp-jpeg-baseline-ybr-422"]
    for index in range(3):
        rgb = np.ascontiguousarray(generate_photo(seed=20261126, index=index, long_side=2048).image)
        dataset, _ = kind.build(rgb, f"runtime-{index}")
        photo = read_photograph(dataset, preview_long_side=onnx.long_side)
        assert photo.preview is not None  # the codec scaled it
        old = eager.analyse(photo.rgb)
        exported = onnx.analyse(photo.rgb)
        fast = onnx.analyse(photo.rgb, preview=photo.preview)
        for other, agreement, tolerance in (
            (exported, ONNX_LABEL_AGREEMENT, ONNX_PROBABILITY_DIFF),
            (fast, PREVIEW_LABEL_AGREEMENT, PREVIEW_PROBABILITY_DIFF),
        ):
            assert other.label_map.shape == photo.rgb.shape[:2]
            assert np.mean(other.label_map == old.label_map) >= agreement
            for name, value in old.probabilities.items():
                assert other.probabilities[name] == pytest.approx(value, abs=tolerance)
            assert other.finding == old.finding
