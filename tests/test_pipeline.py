"""The pipeline's plumbing, with small networks whose weights are random or set by hand.

None of these networks is trained: they test that photos flow through the stages, that the
numbers reported agree with the label map, that flags and fallbacks follow from the mask, and
that weights files are checked against the configuration. Skill is tested separately, on the
shipped reference weights, when they exist.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dermpacs.analysis import BACKGROUND, LESION, SKIN, QualityFlag
from dermpacs.config import Settings
from dermpacs.inference.pipeline import (
    Analyser,
    PhotoError,
    WeightsError,
    argmax_channels,
    labels_at_shape,
    resolve_device,
)
from dermpacs.inference.preprocessing import analysis_shape, resize_photo, to_input_batch
from dermpacs.inference.skintone import srgb_to_lab
from tests.plumbing_models import CLASSES, CROP_SIZE, LONG_SIDE
from tests.plumbing_models import write_plumbing_models as _write_models


def _photo(rows: int = 150, columns: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    photo = np.empty((rows, columns, 3), dtype=np.uint8)
    photo[:] = (200, 150, 125)
    photo += rng.integers(0, 20, size=photo.shape, dtype=np.uint8)
    return photo


def test_random_network_plumbing(tmp_path: Path) -> None:
    analyser = Analyser.from_settings(_write_models(tmp_path, None))
    assert analyser.device == torch.device("cpu")
    assert analyser.long_side == LONG_SIDE and analyser.crop_size == CROP_SIZE
    seg, cls = analyser.segmentation_metadata, analyser.classifier_metadata
    assert analyser.model_version == (
        f"seg-0.0.0-plumbing+{seg.payload_sha256[:8]}/cls-0.0.0-plumbing+{cls.payload_sha256[:8]}"
    )
    result = analyser.analyse(_photo(150, 200))
    assert result.label_map.shape == (150, 200) and result.label_map.dtype == np.uint8
    assert set(np.unique(result.label_map)) <= {BACKGROUND, SKIN, LESION}
    labels = result.label_map
    assert result.skin_fraction == pytest.approx(np.mean(labels != BACKGROUND))
    assert result.lesion_fraction == pytest.approx(np.mean(labels == LESION))
    assert sum(result.probabilities.values()) == pytest.approx(1.0)
    assert list(result.probabilities) == CLASSES
    assert result.finding == max(result.probabilities, key=result.probabilities.__getitem__)
    assert result.atopic_dermatitis_probability == result.probabilities["atopic_dermatitis"]
    assert result.model_version == analyser.model_version
    for stage in (
        "resize",
        "segmentation",
        "mask",
        "crops",
        "classification",
        "skin_tone",
        "quality",
        "total",
    ):
        assert result.timings_ms[stage] >= 0.0


def test_all_lesion_gives_crops_whose_mean_is_the_result(tmp_path: Path) -> None:
    analyser = Analyser.from_settings(_write_models(tmp_path, LESION))
    photo = _photo(300, 400)
    result = analyser.analyse(photo)
    assert np.all(result.label_map == LESION)
    assert result.skin_fraction == 1.0 and result.lesion_fraction == 1.0
    assert result.lesion_fraction_of_skin == 1.0
    assert 1 <= len(result.crops) <= analyser.crop_settings.max_crops
    assert not result.whole_image_fallback
    assert QualityFlag.NO_QUALIFYING_CROP not in result.quality_flags
    for crop in result.crops:
        r0, c0, r1, c1 = crop.box
        assert 0 <= r0 < r1 <= 300 and 0 <= c0 < c1 <= 400
        assert crop.skin_fraction == 1.0 and crop.lesion_fraction == 1.0
        assert sum(crop.probabilities.values()) == pytest.approx(1.0)
    for name in CLASSES:
        mean = np.mean([c.probabilities[name] for c in result.crops])
        assert result.probabilities[name] == pytest.approx(mean)
    # No unaffected skin: no skin tone is claimed.
    assert result.ita_degrees is None and result.ita_category is None


def test_all_skin_falls_back_to_the_whole_photo(tmp_path: Path) -> None:
    analyser = Analyser.from_settings(_write_models(tmp_path, SKIN))
    photo = np.empty((120, 160, 3), dtype=np.uint8)
    photo[:] = (180, 120, 90)
    result = analyser.analyse(photo)
    assert result.crops == ()
    assert result.whole_image_fallback
    assert QualityFlag.NO_QUALIFYING_CROP in result.quality_flags
    assert QualityFlag.TOO_LITTLE_SKIN not in result.quality_flags
    assert QualityFlag.BLUR in result.quality_flags  # a flat photo has no edges at all
    assert sum(result.probabilities.values()) == pytest.approx(1.0)
    lab = srgb_to_lab(np.array((180, 120, 90), dtype=np.uint8))
    assert result.ita_degrees == pytest.approx(np.degrees(np.arctan((lab[0] - 50) / lab[2])))
    assert result.ita_category == "tan"


def test_no_skin_is_flagged(tmp_path: Path) -> None:
    analyser = Analyser.from_settings(_write_models(tmp_path, BACKGROUND))
    result = analyser.analyse(_photo())
    assert result.skin_fraction == 0.0 and result.lesion_fraction_of_skin == 0.0
    assert result.quality_flags[:2] == (QualityFlag.TOO_LITTLE_SKIN, QualityFlag.NO_QUALIFYING_CROP)
    assert result.ita_degrees is None


def test_batch_equals_one_by_one(tmp_path: Path) -> None:
    analyser = Analyser.from_settings(_write_models(tmp_path, None))
    photos = [_photo(150, 200, 0), _photo(200, 150, 1), _photo(150, 200, 2)]
    together = analyser.analyse_batch(photos)
    assert len(together) == 3
    for photo, batched in zip(photos, together, strict=True):
        alone = analyser.analyse(photo)
        assert batched.label_map.shape == photo.shape[:2]
        assert np.mean(batched.label_map != alone.label_map) < 1e-3
        for name in CLASSES:
            assert batched.probabilities[name] == pytest.approx(alone.probabilities[name], abs=1e-4)
    assert analyser.analyse_batch([]) == []


def test_preview_is_the_segmentation_input_and_results_stay_at_full_size(tmp_path: Path) -> None:
    analyser = Analyser.from_settings(_write_models(tmp_path, LESION))
    photo = _photo(600, 800)
    preview = _photo(150, 200, seed=5)  # a different picture: the mask must come from it
    result = analyser.analyse(photo, preview=preview)
    assert result.label_map.shape == (600, 800)
    assert result.crops
    for crop in result.crops:
        r0, c0, r1, c1 = crop.box
        assert 0 <= r0 < r1 <= 600 and 0 <= c0 < c1 <= 800
    # the crops are cut from the full photo: the same as without the preview (all lesion)
    plain = analyser.analyse(photo)
    assert [c.box for c in result.crops] == [c.box for c in plain.crops]
    for name in CLASSES:
        assert result.probabilities[name] == pytest.approx(plain.probabilities[name], abs=1e-6)
    # The segmentation network is shown the preview brought to the photo's analysis shape.
    seen: list[torch.Tensor] = []
    network = analyser.segmentation
    analyser.segmentation = lambda batch: seen.append(batch.clone()) or network(batch)  # type: ignore[assignment]
    analyser.analyse(photo, preview=preview)
    analyser.analyse(photo)
    meta = analyser.segmentation_metadata
    shape = analysis_shape(photo.shape, LONG_SIDE)
    from_preview = to_input_batch(
        [resize_photo(preview, LONG_SIDE, shape=shape)], meta.mean, meta.std
    )
    from_photo = to_input_batch([resize_photo(photo, LONG_SIDE)], meta.mean, meta.std)
    assert torch.equal(seen[0], from_preview) and torch.equal(seen[1], from_photo)
    assert not torch.equal(from_preview, from_photo)


@pytest.mark.parametrize("shape", [(300, 401), (150, 201), (75, 100)])
def test_preview_that_does_not_fit_the_photo_is_refused(
    tmp_path: Path, shape: tuple[int, int]
) -> None:
    analyser = Analyser.from_settings(_write_models(tmp_path, None))
    with pytest.raises(PhotoError, match="preview"):
        analyser.analyse(_photo(600, 800), preview=_photo(*shape))
    with pytest.raises(PhotoError, match="one entry per photo"):
        analyser.analyse_batch([_photo(600, 800)], previews=[])


@pytest.mark.parametrize(
    "bad",
    [np.zeros((10, 10), dtype=np.uint8), np.zeros((10, 10, 3), dtype=np.float32), [[1, 2, 3]]],
)
def test_bad_input_is_refused(tmp_path: Path, bad: object) -> None:
    analyser = Analyser.from_settings(_write_models(tmp_path, None))
    with pytest.raises(PhotoError):
        analyser.analyse(bad)  # type: ignore[arg-type]


def test_weights_that_do_not_match_the_configuration(tmp_path: Path) -> None:
    settings = _write_models(tmp_path, None)
    other_classes = settings.model_copy(deep=True)
    other_classes.model.classes = ["atopic_dermatitis", "psoriasis", "impetigo", "herpes"]
    with pytest.raises(WeightsError, match="classes"):
        Analyser.from_settings(other_classes)
    other_size = settings.model_copy(deep=True)
    other_size.model.long_side = 256
    with pytest.raises(WeightsError, match="input_size"):
        Analyser.from_settings(other_size)
    swapped = settings.model_copy(deep=True)
    swapped.model.segmentation_weights = settings.model.classifier_weights
    with pytest.raises(WeightsError, match="kind"):
        Analyser.from_settings(swapped)
    missing = settings.model_copy(deep=True)
    missing.model.classifier_weights = str(tmp_path / "nowhere.safetensors")
    with pytest.raises(WeightsError, match="classifier_weights"):
        Analyser.from_settings(missing)


def test_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda:0")


def _boundary_logits(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Logits like a segmentation network's: smooth regions (a skin disc holding a lesion)
    with noise, so that the classes meet along curved boundaries."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(
        torch.linspace(-1, 1, rows), torch.linspace(-1, 1, columns), indexing="ij"
    )
    radius = (x**2 + y**2).sqrt()
    lesion = ((x - 0.2) ** 2 + (y + 0.1) ** 2).sqrt()
    logits = torch.stack([(radius - 0.8) * 10, (0.8 - radius) * 10, (0.3 - lesion) * 20])
    return logits + 0.5 * torch.randn(3, rows, columns, generator=generator)


def test_argmax_channels() -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, 37, 50)
    assert np.array_equal(argmax_channels(logits), logits.argmax(0).numpy())
    assert np.array_equal(argmax_channels(logits.numpy()), logits.argmax(0).numpy())
    ties = torch.zeros(3, 4, 4)
    assert not argmax_channels(ties).any()  # the first channel wins ties, as argmax does


@pytest.mark.parametrize(
    ("logits_shape", "shape"),
    [
        ((37, 50), (37, 50)),  # same size: the argmax itself
        ((37, 50), (300, 400)),
        ((37, 50), (1201, 1599)),  # factors that are not whole numbers
        ((96, 128), (750, 1000)),  # a 12-MP photo's ratio, at a quarter of the size
        ((37, 50), (20, 30)),  # smaller than the logits
        ((1, 5), (7, 40)),  # a single row
    ],
)
def test_mask_at_source_size_is_the_argmax_of_bilinear_logits(
    logits_shape: tuple[int, int], shape: tuple[int, int]
) -> None:
    """labels_at_shape interpolates only along boundaries; it must give what upsampling every
    pixel's logits bilinearly and taking the argmax gives, on random logits (every pixel a
    boundary) and on network-like ones (boundaries are a thin band)."""
    for logits in (torch.randn(3, *logits_shape), _boundary_logits(*logits_shape, seed=1)):
        full = F.interpolate(logits[None], size=shape, mode="bilinear", align_corners=False)[0]
        expected = full.argmax(0).numpy()
        found = labels_at_shape(logits, shape)
        assert found.shape == shape and found.dtype == np.uint8
        # float rounding may only flip pixels where two classes (nearly) tie
        assert np.mean(found == expected) >= 0.99999
        disagree = found != expected
        if disagree.any():
            top2 = torch.topk(full, 2, dim=0).values
            assert float((top2[0] - top2[1]).numpy()[disagree].max()) < 1e-5


def test_shipped_weights_segment_a_synthetic_photo(tmp_path: Path) -> None:
    """The reference weights (trained on synthetic photos) find skin and lesion in a new one."""
    from dermpacs.training.synth import generate_photo

    analyser = Analyser.from_settings(Settings.model_validate({"storage": {"root": tmp_path}}))
    dice_skin, dice_lesion = [], []
    for index in range(4):
        photo = generate_photo(seed=987_654, index=index, long_side=640)
        result = analyser.analyse(photo.image)
        truth_skin = photo.mask != BACKGROUND
        found_skin = result.label_map != BACKGROUND
        truth_lesion = photo.mask == LESION
        found_lesion = result.label_map == LESION
        dice_skin.append(
            2 * (truth_skin & found_skin).sum() / (truth_skin.sum() + found_skin.sum())
        )
        dice_lesion.append(
            2 * (truth_lesion & found_lesion).sum() / (truth_lesion.sum() + found_lesion.sum() + 1)
        )
    assert np.mean(dice_skin) > 0.85
    assert np.mean(dice_lesion) > 0.6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_result(tmp_path: Path) -> None:
    """On a GPU machine: ``auto`` picks CUDA, and a batch gives what the CPU gives."""
    settings = _write_models(tmp_path, None)
    on_cpu = Analyser.from_settings(settings)
    auto = settings.model_copy(deep=True)
    auto.model.device = "auto"
    on_gpu = Analyser.from_settings(auto)
    assert on_gpu.device.type == "cuda"
    photos = [_photo(150, 200, 0), _photo(200, 150, 1), _photo(600, 800, 2)]
    for cpu, gpu in zip(on_cpu.analyse_batch(photos), on_gpu.analyse_batch(photos), strict=True):
        assert np.mean(cpu.label_map != gpu.label_map) < 5e-3
        for name in CLASSES:
            assert gpu.probabilities[name] == pytest.approx(cpu.probabilities[name], abs=2e-3)
