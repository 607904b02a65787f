"""``dermpacs process PATH... --out DIR [--json]``: the whole method on DICOM files, offline.

For each DICOM photograph (a folder stands for every file under it, in name order) the method
runs and SEG, SR and overlay Secondary Capture are written to ``DIR/<source SOP Instance
UID>/{seg,sr,overlay}.dcm``. Photos are read a few at a time and analysed as one batch
(``--batch-size``: 8 on a GPU, 4 on the CPU).

With ``--json`` each input gives one JSON line on standard output: what the method found
(``source_sop_instance_uid``, ``skin_fraction``, ``lesion_fraction``, ``crops`` with boxes in
source pixels ``[row0, col0, row1, col1]``, ``probabilities``, ``finding``, ``quality_flags``,
``outputs`` ...), or ``error`` with the reason an input was refused. Without it, one readable
line per input. The exit status is 0 when every input gave results, 1 when some input failed,
2 when nothing could start (no inputs, unusable weights or configuration).

Nothing here logs or prints patient names or IDs: inputs are named by path and UID.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermpacs.config import Settings

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from dermpacs.analysis import PhotoAnalysis
    from dermpacs.imaging.decode import Photograph
    from dermpacs.inference.pipeline import Analyser

log = logging.getLogger(__name__)

OUTPUT_KINDS = ("seg", "sr", "overlay")
GPU_BATCH_SIZE = 8
CPU_BATCH_SIZE = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders")
    parser.add_argument("--out", required=True, help="folder for the result objects")
    parser.add_argument("--json", action="store_true", help="one JSON line per input")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=("photos analysed together (default: 8 on a GPU, 4 on the CPU)"),
    )
    parser.add_argument(
        "--device", default=None, help="auto, cpu, cuda or cuda:N (default: model.device)"
    )


def iter_input_files(paths: Sequence[str | os.PathLike[str]]) -> Iterator[Path]:
    """Files named, and every file under folders named, in order; hidden files are skipped."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                relative = child.relative_to(path)
                if child.is_file() and not any(p.startswith(".") for p in relative.parts):
                    yield child
        else:
            yield path  # a missing file is reported as that input's error


@dataclass
class _Input:
    path: Path
    source: Dataset | None = None
    photo: Photograph | None = None
    error: str | None = None
    reason: str | None = None


def _read(path: Path, settings: Settings, analyser: Analyser) -> _Input:
    from dermpacs.imaging.decode import PhotographError, parse_dicom_file
    from dermpacs.inference.preprocessing import PhotoError, check_rgb
    from dermpacs.processing import read_for_analysis

    item = _Input(path)
    try:
        item.source = parse_dicom_file(path)
        photo = read_for_analysis(item.source, settings, analyser)
        check_rgb(photo.rgb)  # refused here rather than failing the whole batch later
        item.photo = photo
    except PhotographError as exc:
        item.error, item.reason = str(exc), str(exc.reason)
    except PhotoError as exc:
        item.error, item.reason = f"the method cannot analyse this photo: {exc}", "photo"
    except OSError as exc:
        item.error, item.reason = f"cannot read the file: {exc.strerror or exc}", "unreadable"
    return item


def _write(objects: dict[str, Dataset], folder: Path) -> dict[str, str]:
    """Write each object to ``folder/<kind>.dcm`` (temporary name, then rename)."""
    from pydicom import dcmwrite

    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for kind, dataset in objects.items():
        target = folder / f"{kind}.dcm"
        partial = folder / f".{kind}.{uuid.uuid4().hex[:8]}.part"
        try:
            dcmwrite(partial, dataset, enforce_file_format=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        written[kind] = str(target)
    return written


def analysis_record(analysis: PhotoAnalysis) -> dict[str, Any]:
    """What the method found, as JSON-ready values (no label map)."""
    return {
        "skin_fraction": analysis.skin_fraction,
        "lesion_fraction": analysis.lesion_fraction,
        "lesion_fraction_of_skin": analysis.lesion_fraction_of_skin,
        "crops": [
            {
                "box": list(crop.box),
                "skin_fraction": crop.skin_fraction,
                "lesion_fraction": crop.lesion_fraction,
                "probabilities": crop.probabilities,
            }
            for crop in analysis.crops
        ],
        "probabilities": analysis.probabilities,
        "finding": analysis.finding,
        "atopic_dermatitis": analysis.is_atopic_dermatitis,
        "atopic_dermatitis_probability": analysis.atopic_dermatitis_probability,
        "whole_image_fallback": analysis.whole_image_fallback,
        "ita_degrees": analysis.ita_degrees,
        "ita_category": analysis.ita_category,
        "quality_flags": [flag.value for flag in analysis.quality_flags],
        "model_version": analysis.model_version,
        "timings_ms": {k: round(v, 2) for k, v in analysis.timings_ms.items()},
    }


def _results_for(
    item: _Input, analysis: PhotoAnalysis, analyser: Analyser, settings: Settings, out: Path
) -> dict[str, Any]:
    from dermpacs.imaging.results import build_results

    assert item.source is not None and item.photo is not None
    uid = item.photo.sop_instance_uid
    record: dict[str, Any] = {"source": str(item.path), "source_sop_instance_uid": uid}
    record.update(analysis_record(analysis))
    try:
        objects = build_results(
            item.source,
            item.photo.rgb,
            analysis,
            algorithm_version=analyser.model_version,
            class_names=settings.model.classes,
        )
    except ValueError as exc:  # ResultBuildError and UnknownCodeError are ValueErrors
        return {
            "source": str(item.path),
            "source_sop_instance_uid": uid,
            "error": f"results could not be built: {exc}",
            "reason": "result_build",
        }
    try:
        record["outputs"] = _write(objects.as_dict(), out / uid)
    except OSError as exc:
        return {
            "source": str(item.path),
            "source_sop_instance_uid": uid,
            "error": f"results could not be written: {exc}",
            "reason": "write",
        }
    return record


def _print(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record, sort_keys=False), flush=True)
        return
    if "error" in record:
        print(f"{record['source']}: error: {record['error']}", flush=True)
        return
    flags = ",".join(record["quality_flags"]) or "none"
    probability = record["probabilities"][record["finding"]]
    print(
        f"{record['source']}: {record['finding']} ({probability:.2f}), "
        f"{len(record['crops'])} crops, skin {record['skin_fraction']:.0%}, "
        f"lesion {record['lesion_fraction']:.1%}, flags {flags} -> "
        f"{Path(record['outputs']['seg']).parent}",
        flush=True,
    )


def process_files(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    settings: Settings,
    analyser: Analyser,
    *,
    batch_size: int = 1,
) -> Iterator[dict[str, Any]]:
    """Run the method on each DICOM file and write its results; yield one record per input.

    Records are yielded in input order; each is either the findings with ``outputs`` or has an
    ``error`` (and a ``reason``).
    """
    out_dir = Path(out)
    files = iter_input_files(paths)
    size = max(1, batch_size)
    while True:
        chunk = [
            _read(path, settings, analyser) for _, path in zip(range(size), files, strict=False)
        ]
        if not chunk:
            return
        readable = [item.photo for item in chunk if item.photo is not None]
        found = analyser.analyse_batch(
            [photo.rgb for photo in readable], previews=[photo.preview for photo in readable]
        )
        analyses = dict(zip(map(id, readable), found, strict=True))
        for item in chunk:
            if item.photo is not None:
                yield _results_for(item, analyses[id(item.photo)], analyser, settings, out_dir)
            else:
                yield {"source": str(item.path), "error": item.error, "reason": item.reason}


def default_batch_size(analyser: Analyser) -> int:
    """Photos per batch when ``--batch-size`` is not given: 8 on a GPU, whose throughput
    grows with the batch; 4 on the CPU, where ``bench/inference.py`` measured a batch of 4
    only 1-7 % faster per photo than four photos one by one (the networks already use every
    core), so a larger batch would only hold more photos in memory."""
    return GPU_BATCH_SIZE if analyser.device.type == "cuda" else CPU_BATCH_SIZE


def run(args: argparse.Namespace, settings: Settings) -> int:
    from dermpacs.inference.pipeline import Analyser
    from dermpacs.inference.weights import WeightsError

    if args.batch_size is not None and args.batch_size < 1:
        print("dermpacs process: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        analyser = Analyser.from_settings(settings, device=args.device)
    except (WeightsError, ValueError) as exc:
        print(f"dermpacs process: {exc}", file=sys.stderr)
        return 2
    log.info("model %s on %s", analyser.model_version, analyser.device)
    failed = total = 0
    batch_size = args.batch_size or default_batch_size(analyser)
    for record in process_files(args.paths, args.out, settings, analyser, batch_size=batch_size):
        total += 1
        if "error" in record:
            failed += 1
        _print(record, args.json)
    if total == 0:
        print("dermpacs process: no input files", file=sys.stderr)
        return 2
    log.info("%d of %d inputs processed, %d failed", total - failed, total, failed)
    return 1 if failed else 0
