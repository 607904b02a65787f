"""Annotated sets on disk, augmentation, training runs, checkpoints and resuming."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dermpacs.config import CropSettings
from dermpacs.inference.weights import DEFAULT_MEAN, DEFAULT_STD, load_weights
from dermpacs.training.dataset import (
    AnnotatedPhotoSet,
    DatasetError,
    load_mask,
    load_pair,
)
from dermpacs.training.synth import CLASSES, write_synthetic_set
from dermpacs.training.train import (
    BatchAugmenter,
    TrainingError,
    TrainingOptions,
    learning_rate_at,
    resume_path,
    train_classifier,
    train_segmentation,
)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_synthetic_set(root, count=10, seed=31, long_side=96)
    return root


def _hand_made_set(root, rows, image_size=(8, 10), mask_value=1):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "ita"])
        for name, label, ita in rows:
            writer.writerow([name, label, ita])
            Image.new("RGB", image_size[::-1], (200, 150, 120)).save(root / "images" / name)
            mask = np.full(image_size, mask_value, np.uint8)
            Image.fromarray(mask).save(root / "masks" / (name.rsplit(".", 1)[0] + ".png"))
    return root


# --------------------------------------------------------------------------- dataset
def test_synthetic_set_reads_back(tiny_set):
    dataset = AnnotatedPhotoSet(tiny_set, CLASSES)
    assert len(dataset) == 10
    rgb, mask = load_pair(dataset[0])
    assert rgb.dtype == np.uint8 and rgb.shape[:2] == mask.shape
    assert dataset[0].ita is not None and -90 <= dataset[0].ita <= 90
    assert dataset.label_index(dataset[0]) == CLASSES.index(dataset[0].label)


def test_hospital_set_with_jpeg_photos_and_no_generator_columns(tmp_path):
    root = _hand_made_set(tmp_path / "h", [("a.jpg", "impetigo", ""), ("b.jpg", "impetigo", "12")])
    dataset = AnnotatedPhotoSet(root, CLASSES)
    assert dataset[0].ita is None and dataset[1].ita == 12.0
    assert load_pair(dataset[1])[1].max() == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda root: (root / "labels.csv").unlink(), "no labels.csv"),
        (lambda root: (root / "labels.csv").write_text("image,diagnosis\na.png,x\n"), "missing"),
        (lambda root: (root / "masks" / "a.png").unlink(), "mask"),
        (lambda root: (root / "images" / "a.png").unlink(), "photo"),
        (lambda root: (root / "labels.csv").write_text("image,label\na.png,psoriasis\n"), "psor"),
        (
            lambda root: (root / "labels.csv").write_text(
                "image,label\na.png,impetigo\na.png,impetigo\n"
            ),
            "twice",
        ),
        (
            lambda root: (root / "labels.csv").write_text("image,label,ita\na.png,impetigo,x\n"),
            "ita",
        ),
        (lambda root: (root / "labels.csv").write_text("image,label\n"), "no photos"),
    ],
)
def test_bad_layouts_are_named(tmp_path, change, message):
    root = _hand_made_set(tmp_path / "s", [("a.png", "impetigo", "")])
    change(root)
    with pytest.raises(DatasetError, match=message):
        AnnotatedPhotoSet(root, CLASSES)


def test_mask_values_and_size_are_checked(tmp_path):
    root = _hand_made_set(tmp_path / "v", [("a.png", "impetigo", "")], mask_value=255)
    with pytest.raises(DatasetError, match="labels must be 0"):
        load_pair(AnnotatedPhotoSet(root)[0])
    photo = AnnotatedPhotoSet(_hand_made_set(tmp_path / "w", [("a.png", "impetigo", "")]))[0]
    with pytest.raises(DatasetError, match="mask is 8x10 but the photo is 9x10"):
        load_mask(photo, (9, 10))
    Image.new("RGB", (10, 8)).save(photo.mask_path)
    with pytest.raises(DatasetError, match="one channel"):
        load_mask(photo)


# --------------------------------------------------------------------------- pieces
def test_learning_rate_warms_up_then_decays_to_zero():
    rates = [learning_rate_at(s, 10, 5, 1e-3) for s in range(50)]
    # two warm-up epochs of ten steps
    assert rates[0] == pytest.approx(5e-5) and rates[19] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(rates[:19], rates[1:20], strict=True))
    assert all(a >= b for a, b in zip(rates[19:], rates[20:], strict=False))
    assert rates[-1] < 1e-5
    # a shorter plan decided after the warm-up keeps the warm-up unchanged
    shorter = [learning_rate_at(s, 10, 3, 1e-3) for s in range(20)]
    assert shorter == rates[:20]
    # a two-epoch run warms up over one epoch
    assert learning_rate_at(9, 10, 2, 1e-3) == pytest.approx(1e-3)


def test_augmentation_is_seeded_keeps_labels_and_padding():
    augment = BatchAugmenter(
        torch.device("cpu"), 64, DEFAULT_MEAN, DEFAULT_STD, with_label=True, rotate=0.5, scale=0.2
    )
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    labels = torch.randint(0, 3, (6, 1, 64, 64), dtype=torch.uint8)
    valid = torch.ones((6, 1, 64, 64), dtype=torch.uint8)
    valid[:, :, 48:] = 0
    augment.reseed(5)
    x1, y1 = augment(images, labels, valid)
    augment.reseed(5)
    x2, y2 = augment(images, labels, valid)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (6, 3, 64, 64) and y1.shape == (6, 1, 64, 64)
    assert set(torch.unique(y1).tolist()) <= {0, 1, 2}
    augment.reseed(6)
    x3, _ = augment(images, labels, valid)
    assert not torch.equal(x1, x3)
    # the geometry moves image and labels together: the padding (zero after normalisation)
    # lands where the labels were moved from, never on a pixel that kept its photo content
    flat = (x1.abs().sum(1, keepdim=True) == 0).float().mean()
    assert 0.0 < float(flat) < 0.6


# --------------------------------------------------------------------------- runs
def _options(tiny_set, tmp_path, task, **changes):
    options = TrainingOptions(
        task=task,
        data=str(tiny_set),
        out=str(tmp_path / f"{task}.safetensors"),
        epochs=2,
        batch_size=4,
        seed=3,
        device="cpu",
        long_side=64,
        input_size=32,
        classes=CLASSES if task == "classifier" else (),
        validation_fraction=0.2,
        progress=False,
        network={"aspp_channels": 16, "decoder_channels": 16}
        if task == "segmentation"
        else {"widths": [8, 16, 16, 16]},
    )
    for key, value in changes.items():
        setattr(options, key, value)
    return options


def _tensors(path):
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


@pytest.mark.slow
def test_segmentation_run_writes_weights_with_metadata_and_a_separate_checkpoint(
    tiny_set, tmp_path
):
    result = train_segmentation(_options(tiny_set, tmp_path, "segmentation"))
    model, metadata = load_weights(result.weights, expected={"kind": "segmentation"})
    assert metadata.classes == ("background", "skin", "lesion")
    assert metadata.input_size == 64
    assert metadata.mean == tuple(DEFAULT_MEAN) and metadata.std == tuple(DEFAULT_STD)
    assert metadata.provenance["epochs"] == 2 and metadata.provenance["seed"] == 3
    assert len(metadata.payload_sha256) == 64
    assert not any(k.startswith("optimizer/") for k in _tensors(result.weights))
    checkpoint = _tensors(resume_path(result.weights))
    assert any(k.startswith("optimizer/") for k in checkpoint)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert "val_lesion_dice" in result.history[-1]
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, 3, 64, 64)


@pytest.mark.slow
def test_same_seed_same_weights_and_resume_equals_an_uninterrupted_run(tiny_set, tmp_path):
    straight = train_segmentation(_options(tiny_set, tmp_path / "a", "segmentation"))
    again = train_segmentation(_options(tiny_set, tmp_path / "b", "segmentation"))
    assert straight.metadata.payload_sha256 == again.metadata.payload_sha256
    first = train_segmentation(_options(tiny_set, tmp_path / "c", "segmentation", epochs=1))
    resumed = train_segmentation(
        _options(tiny_set, tmp_path / "c", "segmentation", resume=str(first.resume_checkpoint))
    )
    assert resumed.epochs_run == 2
    assert resumed.metadata.payload_sha256 == straight.metadata.payload_sha256
    other_seed = train_segmentation(_options(tiny_set, tmp_path / "d", "segmentation", seed=4))
    assert other_seed.metadata.payload_sha256 != straight.metadata.payload_sha256


def test_classifier_run_on_truth_crops(tiny_set, tmp_path):
    result = train_classifier(_options(tiny_set, tmp_path, "classifier"), CropSettings())
    model, metadata = load_weights(
        result.weights, expected={"kind": "classifier", "classes": list(CLASSES)}
    )
    assert metadata.input_size == 32
    assert "val_photo_accuracy" in result.history[-1]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, len(CLASSES))


def test_resume_checkpoint_of_the_other_task_is_refused(tiny_set, tmp_path):
    seg = train_segmentation(_options(tiny_set, tmp_path, "segmentation", epochs=1))
    with pytest.raises(TrainingError, match="segmentation run"):
        train_classifier(
            _options(tiny_set, tmp_path, "classifier", resume=str(seg.resume_checkpoint)),
            CropSettings(),
        )


def test_bad_options_are_refused(tiny_set, tmp_path):
    with pytest.raises(TrainingError, match="multiple of 32"):
        train_segmentation(_options(tiny_set, tmp_path, "segmentation", long_side=100))
    with pytest.raises(DatasetError, match="not one of"):
        train_classifier(
            _options(tiny_set, tmp_path, "classifier", classes=("a", "b")), CropSettings()
        )


def test_cli_trains(tiny_set, tmp_path):
    from dermpacs.cli import main

    out = tmp_path / "cli.safetensors"
    code = main(
        [
            "train",
            "classifier",
            "--data",
            str(tiny_set),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--input-size",
            "32",
            "--long-side",
            "64",
            "--device",
            "cpu",
            "--network",
            '{"widths": [8, 8, 8, 8]}',
            "--no-progress",
        ]
    )
    assert code == 0 and out.is_file()
    assert main(["train", "classifier", "--data", str(tiny_set), "--out", str(out),
                 "--network", "[1]"]) == 2  # fmt: skip
    assert math.isfinite(load_weights(out)[1].provenance["last_epoch"]["loss"])


@pytest.mark.slow
def test_time_limit_shortens_the_run_after_the_warm_up(tiny_set, tmp_path):
    result = train_segmentation(
        _options(tiny_set, tmp_path, "segmentation", epochs=6, time_limit=0.001)
    )
    assert result.epochs_run == 2  # the two warm-up epochs always run
    assert result.metadata.provenance["epochs"] == 2
