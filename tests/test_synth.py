"""The synthetic photo generator: determinism, exact masks, skin tones, the folder layout."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
from PIL import Image

from dermpacs.analysis import BACKGROUND, LESION, SKIN
from dermpacs.training import synth
from dermpacs.training.synth import (
    CLASSES,
    LABEL_COLUMNS,
    SynthError,
    generate_photo,
    ita_category,
    lab_to_srgb,
    srgb_to_lab,
    write_synthetic_set,
)


def test_same_seed_and_index_give_the_same_photo():
    a, b = generate_photo(3, 7, long_side=256), generate_photo(3, 7, long_side=256)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.label == b.label and a.parameters == b.parameters
    c = generate_photo(3, 8, long_side=256)
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)


def test_photo_shape_labels_and_long_side():
    for index in range(12):
        photo = generate_photo(1, index, long_side=320)
        assert max(photo.image.shape[:2]) == 320
        assert photo.image.dtype == np.uint8 and photo.image.shape[2] == 3
        assert photo.mask.shape == photo.image.shape[:2]
        assert set(np.unique(photo.mask)) <= {BACKGROUND, SKIN, LESION}
        assert (photo.mask == LESION).any(), "every photo shows its lesion"
        assert (photo.mask == SKIN).any()
        assert photo.label in CLASSES
        fractions = photo.parameters
        assert fractions["lesion_fraction"] == pytest.approx(
            (photo.mask == LESION).mean(), abs=1e-4
        )


@pytest.mark.parametrize("painter", sorted(synth._LESION_PAINTERS))
def test_lesions_are_drawn_only_on_skin(painter):
    """A painter given skin on the left half only leaves the right half untouched."""
    rng = np.random.default_rng(0)
    h, w = 200, 300
    skin = np.zeros((h, w), bool)
    skin[:, :150] = True
    image = np.full((h, w, 3), 0.6, np.float32)
    before = image.copy()
    alpha, count = synth._LESION_PAINTERS[painter](rng, image, skin, np.array([60.0, 12, 16]), 20.0)
    assert count >= 1
    assert alpha[:, 150:].max() == 0.0
    assert (alpha[:, :150] >= 0.5).any()
    assert np.array_equal(image[:, 151:], before[:, 151:])
    # where the mask says lesion, the photo was changed
    changed = np.abs(image - before).max(axis=2) > 0.02
    assert changed[alpha >= 0.5].mean() > 0.9


def test_mask_lesion_is_where_the_photo_differs_from_skin():
    """On a clean close-up the labelled lesion differs in colour from the labelled skin."""
    photo = generate_photo(5, 2, long_side=256)
    lab = srgb_to_lab(photo.image / 255.0)
    lesion = lab[photo.mask == LESION].mean(axis=0)
    skin = lab[photo.mask == SKIN].mean(axis=0)
    assert np.linalg.norm(lesion - skin) > 5.0


def test_colour_conversion_round_trip():
    lab = np.array([[70.0, 12.0, 18.0], [30.0, 8.0, 14.0], [90.0, -2.0, 5.0]])
    assert np.allclose(srgb_to_lab(lab_to_srgb(lab)), lab, atol=0.05)


def test_skin_tones_cover_the_whole_ita_range():
    rng = np.random.default_rng(0)
    categories = set()
    for _ in range(400):
        lab, ita = synth._sample_skin_lab(rng)
        measured = np.degrees(np.arctan2(lab[0] - 50.0, lab[2]))
        assert measured == pytest.approx(ita, abs=1e-6)
        categories.add(ita_category(ita))
    assert categories == {"very_light", "light", "intermediate", "tan", "brown", "dark"}


def test_ita_categories():
    assert ita_category(60) == "very_light"
    assert ita_category(50) == "light"
    assert ita_category(30) == "intermediate"
    assert ita_category(20) == "tan"
    assert ita_category(0) == "brown"
    assert ita_category(-45) == "dark"


def test_written_set_has_the_documented_layout_and_does_not_depend_on_workers(tmp_path):
    one = write_synthetic_set(tmp_path / "one", count=6, seed=2, long_side=160, workers=1)
    two = write_synthetic_set(tmp_path / "two", count=6, seed=2, long_side=160, workers=2)
    with open(one) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(LABEL_COLUMNS)
    assert [r["image"] for r in rows] == [f"synth_2_{i:06d}.png" for i in range(6)]
    assert one.read_text() == two.read_text()
    for row in rows:
        image = np.asarray(Image.open(tmp_path / "one" / "images" / row["image"]))
        mask = np.asarray(Image.open(tmp_path / "one" / "masks" / row["image"]))
        other = np.asarray(Image.open(tmp_path / "two" / "images" / row["image"]))
        assert image.shape[:2] == mask.shape and np.array_equal(image, other)
        assert float(row["lesion_fraction"]) == pytest.approx((mask == LESION).mean(), abs=1e-4)
        assert row["ita_category"] == ita_category(float(row["ita"]))


def test_negatives_have_no_skin_and_are_deterministic():
    scenes = set()
    for index in range(24):
        photo = generate_photo(6, index, long_side=192, negative_fraction=1.0)
        again = generate_photo(6, index, long_side=192, negative_fraction=1.0)
        assert np.array_equal(photo.image, again.image) and photo.parameters == again.parameters
        assert photo.label == synth.NEGATIVE_LABEL
        assert photo.mask.shape == photo.image.shape[:2] and not photo.mask.any()
        assert photo.parameters["scene"] == "negative" and photo.parameters["skin_fraction"] == 0
        assert photo.image.std() > 3.0, "a negative shows something, not a flat colour"
        scenes.add(photo.parameters["background"])
    assert len(scenes) >= 5, scenes


def test_negative_share_leaves_the_other_photos_unchanged():
    plain = [generate_photo(7, i, long_side=128) for i in range(30)]
    mixed = [generate_photo(7, i, long_side=128, negative_fraction=0.3) for i in range(30)]
    negatives = [m for m in mixed if m.label == synth.NEGATIVE_LABEL]
    assert 3 <= len(negatives) <= 18
    for p, m in zip(plain, mixed, strict=True):
        if m.label != synth.NEGATIVE_LABEL:
            assert np.array_equal(p.image, m.image) and np.array_equal(p.mask, m.mask)
    with pytest.raises(SynthError):
        generate_photo(7, 0, negative_fraction=1.5)


@pytest.mark.parametrize("kind", synth._OBJECT_KINDS)
def test_distractor_objects_change_only_the_image(kind):
    """Objects are drawn into the background layer: something is drawn, nothing else moves."""
    for seed in range(6):
        image = np.full((160, 200, 3), 0.5, np.float32)
        synth._object(np.random.default_rng(seed), image, kind)
        assert np.isfinite(image).all() and image.min() >= 0.0
        if np.abs(image - 0.5).max() > 0.05:
            return
    pytest.fail(f"{kind}: nothing drawn in six tries")


def test_written_set_with_negatives_trains_segmentation_only(tmp_path):
    from dermpacs.training.dataset import AnnotatedPhotoSet, DatasetError

    labels = write_synthetic_set(tmp_path, count=8, seed=3, long_side=128, negative_fraction=0.5)
    with open(labels) as handle:
        rows = list(csv.DictReader(handle))
    negatives = [r for r in rows if r["label"] == synth.NEGATIVE_LABEL]
    assert negatives and len(negatives) < len(rows)
    for row in negatives:
        mask = np.asarray(Image.open(tmp_path / "masks" / row["image"]))
        assert not mask.any() and row["ita"] == ""
    assert len(AnnotatedPhotoSet(tmp_path)) == 8  # segmentation reads any label
    with pytest.raises(DatasetError, match="none"):
        AnnotatedPhotoSet(tmp_path, CLASSES)  # the classifier and evaluation refuse negatives


def test_colour_helpers_are_the_pipelines():
    """One CIELAB and one set of ITA boundaries: the generator's labels match the pipeline's."""
    from dermpacs.inference import skintone

    assert synth.srgb_to_lab is skintone.srgb_to_lab
    assert synth.ita_category is skintone.ita_category
    for boundary in (55.0, 41.0, 28.0, 10.0, -30.0):
        assert ita_category(boundary) != ita_category(boundary + 1e-6)


def test_classes_are_drawn_evenly():
    labels = [generate_photo(9, i, long_side=128).label for i in range(80)]
    counts = {c: labels.count(c) for c in CLASSES}
    assert min(counts.values()) >= 10, counts


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SynthError):
        write_synthetic_set(tmp_path, count=0, seed=1)
    with pytest.raises(SynthError):
        generate_photo(1, 0, classes=["psoriasis"])
    with pytest.raises(SynthError):
        generate_photo(1, 0, long_side=32)


def test_cli_writes_a_set(tmp_path):
    from dermpacs.cli import main

    assert (
        main(
            [
                "synth",
                "--out",
                str(tmp_path),
                "--count",
                "3",
                "--seed",
                "4",
                "--size",
                "128",
                "--no-progress",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "images").glob("*.png"))) == 3
    assert (tmp_path / "labels.csv").read_text().count("\n") == 4


@pytest.mark.slow
def test_generation_speed():
    """The brief asks for 20 photos/s at 512 px on one core; this shared CI core is slower,
    so the test guards against a large regression only (docs/training.md has the figure)."""
    generate_photo(0, 0)
    started = time.process_time()
    for index in range(20):
        generate_photo(0, index)
    rate = 20 / (time.process_time() - started)
    assert rate > 8.0, f"{rate:.1f} photos/s"


def _visible_skin(body: synth._Body) -> np.ndarray:
    skin = body.coverage >= 0.5
    for overlay in body.overlays:
        skin &= overlay.alpha < 0.5
    return skin


@pytest.mark.parametrize("seed", range(4))
def test_faces_have_eyes_brows_and_clothing_that_are_not_skin(seed):
    """A head and shoulders: one skin region (face, ears, neck) with at least the two eyes as
    holes in it; the shoulders' clothing and the hair are drawn but are not skin."""
    from scipy import ndimage

    h, w = 384, 288
    body = synth._face(np.random.default_rng(seed), h, w)
    assert body.region == "face"
    skin = _visible_skin(body)
    assert 0.03 < skin.mean() < 0.7
    components, n = ndimage.label(skin)
    sizes = np.bincount(components.ravel())[1:]
    assert sizes.max() > 0.9 * skin.sum(), "face and neck are one piece of skin"
    holes, n_holes = ndimage.label(~skin & ndimage.binary_fill_holes(skin))
    assert n_holes >= 2, "the eyes are holes in the face's skin"
    hidden = (body.coverage >= 0.5) & ~skin
    drawn = np.zeros((h, w), bool)
    for overlay in body.overlays:
        drawn |= overlay.alpha >= 0.5
    assert hidden.any() and (drawn & (body.coverage < 0.5)).any(), "clothing or hair off skin"
    assert body.shade[skin].min() > 0.3 and body.shade.max() < 1.3
    # the shading draws the features: the face is not one flat cylinder
    face = skin & (np.arange(h)[:, None] < h * 0.7)
    assert np.std(body.shade[face]) > 0.03


@pytest.mark.parametrize("seed", range(4))
def test_hands_have_fingers(seed):
    """A hand is a palm with thin fingers: an opening wider than a finger removes a good share
    of its skin, where it would leave a plain limb almost whole."""
    from scipy import ndimage

    h, w = 384, 512
    body = synth._hand(np.random.default_rng(seed), h, w)
    assert body.region == "hand"
    skin = body.coverage >= 0.5
    assert skin.mean() > 0.02
    # fingers are about a fifth of the palm's half-width (7..15 % of the short side) wide each
    radius = int(0.025 * min(h, w)) + 2
    disk = np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1]) <= radius
    opened = ndimage.binary_opening(skin, structure=disk)
    assert opened.sum() < 0.93 * skin.sum(), "thin fingers vanish in the opening"
    assert opened.sum() > 0.2 * skin.sum(), "palm and forearm stay"


def test_realistic_long_shots_show_faces_hands_and_outdoor_scenes():
    photos = [generate_photo(5, i, long_side=160, realistic=True) for i in range(60)]
    regions = {p.parameters["body_region"] for p in photos}
    assert {"face", "hand"} <= regions
    backgrounds = {p.parameters["background"] for p in photos}
    assert backgrounds & set(synth.NEGATIVE_SCENES), "some people are photographed outdoors"
    for p in photos:
        assert (p.mask == SKIN).any() and (p.mask == LESION).any()
    # off, the photos of earlier versions: rooms only, and the same photo where nothing differs
    plain = [generate_photo(5, i, long_side=160) for i in range(60)]
    assert not {p.parameters["background"] for p in plain} & set(synth.NEGATIVE_SCENES)
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(photos, plain, strict=True))


def test_faces_have_flushed_lips_gloss_and_sometimes_teeth():
    from scipy import ndimage

    holes_seen = []
    for seed in range(10):
        body = synth._face(np.random.default_rng(seed), 320, 240)
        assert body.flush is not None and body.gloss is not None
        assert body.flush.max() > 0.2, "the lips are redder than the rest of the face"
        assert body.gloss.min() >= 0.0 and body.gloss.max() <= 0.6
        skin = _visible_skin(body)
        _, n_holes = ndimage.label(~skin & ndimage.binary_fill_holes(skin))
        holes_seen.append(n_holes)
    assert max(holes_seen) >= 3, "a smile shows teeth (not skin) beside the two eyes"


def test_metered_exposure_brings_the_brightest_parts_near_white():
    """Most photos are metered: a dim scene comes out with its highlights near white, so light
    skin is not kept grey by the shading and the light fall-off."""
    metered = 0
    for seed in range(20):
        image = np.full((64, 96, 3), 0.45, np.float32)
        out = synth._lighting(np.random.default_rng(seed), image.copy(), {}, metered=True)
        metered += 0.7 * 255 < np.percentile(out.mean(axis=2), 99) < 1.15 * 255
        plain = synth._lighting(np.random.default_rng(seed), image, {})
        assert np.percentile(plain.mean(axis=2), 99) < 0.7 * 255, "unmetered: as drawn"
    assert metered >= 8, metered


def test_cli_realistic_writes_what_generate_photo_draws(tmp_path):
    from dermpacs.cli import main

    args = ["synth", "--out", str(tmp_path), "--count", "2", "--seed", "24", "--size", "96"]
    assert main([*args, "--realistic", "--no-progress"]) == 0
    for index in range(2):
        written = np.asarray(Image.open(tmp_path / "images" / f"synth_24_{index:06d}.png"))
        assert np.array_equal(written, generate_photo(24, index, 96, realistic=True).image)
