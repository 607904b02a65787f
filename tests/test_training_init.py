"""Fine-tuning segmentation from earlier weights (``--init``) on windows (``--crop``) of a set
that holds negatives (photos without skin)."""

from __future__ import annotations

import pytest
import torch

from dermpacs.inference.weights import load_weights
from dermpacs.training.synth import write_synthetic_set
from dermpacs.training.train import TrainingError, TrainingOptions, train_segmentation

NETWORK = {"aspp_channels": 16, "decoder_channels": 16}


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    write_synthetic_set(root, count=8, seed=41, long_side=128, negative_fraction=0.4)
    return root


def _options(data, out, **changes):
    options = TrainingOptions(
        task="segmentation",
        data=str(data),
        out=str(out),
        epochs=2,
        batch_size=4,
        learning_rate=1e-3,
        seed=5,
        device="cpu",
        long_side=128,
        validation_fraction=0.25,
        progress=False,
        network=dict(NETWORK),
    )
    for key, value in changes.items():
        setattr(options, key, value)
    return options


@pytest.fixture(scope="module")
def start_weights(mixed_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("start") / "start.safetensors"
    # another seed than the runs below: their fresh networks start elsewhere
    train_segmentation(_options(mixed_set, out, epochs=1, crop=64, seed=11))
    return out


def _state(path):
    model, metadata = load_weights(path)
    return {k: v.clone() for k, v in model.state_dict().items()}, metadata


def test_fine_tune_starts_from_the_given_weights_and_records_them(
    mixed_set, start_weights, tmp_path
):
    start, start_meta = _state(start_weights)
    out = tmp_path / "tuned.safetensors"
    result = train_segmentation(
        _options(mixed_set, out, init=str(start_weights), crop=64, network={}, version="t-1")
    )
    tuned, metadata = _state(result.weights)
    assert metadata.provenance["init"] == start_meta.model_version
    assert metadata.provenance["crop"] == 64
    assert metadata.input_size == 128 and metadata.architecture_args == start_meta.architecture_args
    assert metadata.model_version.startswith("t-1+")
    changed = [k for k in start if not torch.equal(start[k], tuned[k])]
    assert changed, "fine-tuning changed nothing"
    # a fresh network with the same seed is far from the fine-tuned one: it did start from init
    fresh = train_segmentation(_options(mixed_set, tmp_path / "fresh.safetensors", crop=64))
    fresh_state, _ = _state(fresh.weights)
    key = next(k for k in start if k.endswith("weight") and start[k].dim() == 4)
    assert (tuned[key] - start[key]).abs().mean() < (fresh_state[key] - start[key]).abs().mean()


def test_fine_tune_is_repeatable_on_the_cpu(mixed_set, start_weights, tmp_path):
    runs = [
        train_segmentation(
            _options(mixed_set, tmp_path / f"{i}.safetensors", init=str(start_weights), crop=64)
        )
        for i in range(2)
    ]
    assert runs[0].metadata.payload_sha256 == runs[1].metadata.payload_sha256


def test_unusable_init_and_crop_are_refused(mixed_set, start_weights, tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(TrainingError, match="input_size"):
        train_segmentation(_options(mixed_set, out, init=str(start_weights), long_side=96 + 64))
    with pytest.raises(TrainingError, match="network asks"):
        train_segmentation(
            _options(mixed_set, out, init=str(start_weights), network={"aspp_channels": 32})
        )
    with pytest.raises(TrainingError, match="--init"):
        train_segmentation(_options(mixed_set, out, init=str(tmp_path / "missing.safetensors")))
    with pytest.raises(TrainingError, match="crop"):
        train_segmentation(_options(mixed_set, out, crop=100))
    with pytest.raises(TrainingError, match="crop"):
        train_segmentation(_options(mixed_set, out, crop=256))
