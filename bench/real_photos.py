"""Run the trained method on real photographs that ship inside installed Python packages.

Nobody generated these photos: they show whether the segmentation, trained on synthetic photos
only, finds skin on faces and hands and leaves animals, objects and scenes alone. The script looks
for the sample images bundled with scikit-image (``skimage/data``), matplotlib
(``mpl-data/sample_data``) and scikit-learn (``datasets/images``), plus any paths given, runs
:class:`dermpacs.inference.pipeline.Analyser` on each colour photo and writes

* a panel (photo | mask overlay: skin green, lesion red) as JPEG, and
* a JSON list with each photo's skin and lesion fractions and the classifier's finding.

    python bench/real_photos.py --segmentation-weights S --classifier-weights C \
        --out docs/img/real_photos.jpg --json docs/img/real_photos.json [extra photos ...]

Nothing is downloaded: packages that are not installed, or that keep their samples online, add
nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SUFFIXES = {".png", ".jpg", ".jpeg"}
TILE_HEIGHT = 200

#: What the bundled sample photos show: "person" photos should have skin, the others none.
WHAT = {
    "astronaut.png": "person",
    "grace_hopper.jpg": "person",
    "chelsea.png": "animal",
    "coffee.png": "object",
    "color.png": "graphic",
    "hubble_deep_field.jpg": "scene",
    "ihc.png": "microscopy",
    "logo.png": "graphic",
    "logo2.png": "graphic",
    "motorcycle_left.png": "object",
    "motorcycle_right.png": "object",
    "retina.jpg": "retina",
    "rocket.jpg": "scene",
    "Minduka_Present_Blue_Pack.png": "object",
    "china.jpg": "scene",
    "flower.jpg": "plant",
    "jetty-pic.png": "scene",  # a Jetty demo banner (sea and sky), passed as an extra photo
}
#: Boxes (x0, y0, x1, y1, source pixels) drawn by eye well inside the bare skin of the faces
#: (astronaut: forehead to chin; Grace Hopper: below the glasses to the chin). Evaluation
#: annotations only: nothing is trained or tuned on these photos.
FACE_BOXES = {
    "astronaut.png": (185, 80, 262, 158),
    "grace_hopper.jpg": (190, 235, 345, 315),
}


def bundled_photos() -> list[Path]:
    """Colour sample photos bundled with installed packages (no download)."""
    places = [
        ("skimage", "data"),
        ("matplotlib", "mpl-data/sample_data"),
        ("sklearn", "datasets/images"),
    ]
    found: list[Path] = []
    for package, folder in places:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations))) / folder
        if root.is_dir():
            found += sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES)
    return found


def load_colour_photo(path: Path) -> np.ndarray | None:
    """RGB pixels of a photo with at least 128 px a side and real colour, else None."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                return None
            rgb = np.asarray(image.convert("RGB"))
    except OSError:
        return None
    if min(rgb.shape[:2]) < 128:
        return None
    spread = rgb.astype(np.int16).max(axis=2) - rgb.astype(np.int16).min(axis=2)
    return rgb if spread.mean() > 8 else None  # grey images carry no skin colour


def overlay(rgb: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    """Skin tinted green, lesion red, background darkened."""
    out = rgb.astype(np.float32) * 0.55
    tint = np.zeros_like(out)
    tint[label_map == 1] = (40, 200, 40)
    tint[label_map == 2] = (230, 30, 30)
    painted = label_map > 0
    out[painted] = rgb[painted] * 0.45 + tint[painted] * 0.55
    return out.clip(0, 255).astype(np.uint8)


def tile(rgb: np.ndarray, label_map: np.ndarray, caption: str) -> Image.Image:
    scale = TILE_HEIGHT / rgb.shape[0]
    size = (max(1, round(rgb.shape[1] * scale)), TILE_HEIGHT)
    left = Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR)
    right = Image.fromarray(overlay(rgb, label_map)).resize(size, Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (size[0] * 2 + 6, TILE_HEIGHT + 16), (255, 255, 255))
    canvas.paste(left, (0, 16))
    canvas.paste(right, (size[0] + 6, 16))
    ImageDraw.Draw(canvas).text((2, 2), caption, fill=(0, 0, 0))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="*", help="more photos to analyse")
    parser.add_argument("--segmentation-weights", required=True)
    parser.add_argument("--classifier-weights", required=True)
    parser.add_argument("--out", required=True, help="panel (JPEG)")
    parser.add_argument("--json", required=True, help="figures per photo")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from dermpacs.config import Settings
    from dermpacs.inference.pipeline import Analyser
    from dermpacs.inference.weights import read_metadata

    settings = Settings()
    settings.model.segmentation_weights = args.segmentation_weights
    settings.model.classifier_weights = args.classifier_weights
    settings.model.long_side = read_metadata(args.segmentation_weights).input_size
    analyser = Analyser.from_settings(settings, device=args.device)

    tiles: list[Image.Image] = []
    figures = []
    for path in bundled_photos() + [Path(p) for p in args.photos]:
        rgb = load_colour_photo(path)
        if rgb is None:
            continue
        result = analyser.analyse(rgb)
        face_skin = None
        if path.name in FACE_BOXES and rgb.shape[:2] == result.label_map.shape:
            x0, y0, x1, y1 = FACE_BOXES[path.name]
            face_skin = round(float((result.label_map[y0:y1, x0:x1] > 0).mean()), 4)
        figures.append(
            {
                "photo": f"{path.parent.name}/{path.name}",
                "what": WHAT.get(path.name, ""),
                "face_box_skin_fraction": face_skin,
                "rows": int(rgb.shape[0]),
                "columns": int(rgb.shape[1]),
                "skin_fraction": round(result.skin_fraction, 4),
                "lesion_fraction": round(result.lesion_fraction, 4),
                "crops": len(result.crops),
                "finding": result.finding,
                "quality_flags": [flag.value for flag in result.quality_flags],
            }
        )
        caption = f"{path.name}: skin {100 * result.skin_fraction:.0f}%"
        caption += f", lesion {100 * result.lesion_fraction:.0f}%"
        tiles.append(tile(rgb, result.label_map, caption))
        print(json.dumps(figures[-1]))
    if not tiles:
        raise SystemExit("no colour photos found")
    faces = [
        f["face_box_skin_fraction"] for f in figures if f["face_box_skin_fraction"] is not None
    ]
    others = [f["skin_fraction"] for f in figures if f["what"] not in ("person", "")]
    if faces:
        print(f"faces: {100 * np.mean(faces):.0f} % of the face boxes found as skin")
    if others:
        print(f"photos without people: {100 * np.mean(others):.0f} % skin on average")
    # two tiles a row
    rows = [tiles[i : i + 2] for i in range(0, len(tiles), 2)]
    width = max(sum(t.width for t in row) + 8 * (len(row) - 1) for row in rows)
    height = sum(max(t.height for t in row) for row in rows) + 8 * (len(rows) - 1)
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for row in rows:
        x = 0
        for t in row:
            panel.paste(t, (x, y))
            x += t.width + 8
        y += max(t.height for t in row) + 8
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    panel.save(args.out, quality=85)
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
