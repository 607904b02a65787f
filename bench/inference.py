"""Inference: milliseconds per photo for each stage of the method, at 1, 4 and 12 megapixels.

For camera photos (img2dcm JPEG) of each size, one photo at a time as a worker takes them:

* decode: the full JPEG (:func:`~dermpacs.imaging.decode.read_photograph`, the baseline) or
  at reduced scale (:func:`~dermpacs.imaging.decode.read_photograph_scaled`, DCT scaling) to
  the smallest long side that keeps every crop at least as large as the classifier's input;
* the Analyser's own stage timings: resize to the analysis scale, segmentation, the label map
  at the source's size, crops, classification, skin tone, quality;
* the result objects (SEG, SR, overlay; full decode only, since the overlay is drawn on the
  full photo);

each with the networks in eager PyTorch (the baseline) and in ONNX Runtime, whose outputs are
checked against eager PyTorch (logits, labels, probabilities) and against each other's decode.
``torch.compile`` is timed on the segmentation network at the analysis scale, compile time
included. Peak resident memory of a worker-like process (models loaded, one photo of each
size decoded, analysed and its results built) is measured in a fresh process per variant.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import inputs
from bench.machine import machine_facts
from bench.models import choose_model
from bench.services import REPO, exit_on_sigterm

SIZES = ("1mp", "4mp", "12mp")
METHOD_TARGET_SECONDS = 0.5  # issue 7: the whole method under 0.5 s per 12-MP photo
# Stated tolerances for "equal": ONNX Runtime against eager PyTorch on the same input.
LOGIT_TOLERANCE = 1e-3
PROBABILITY_TOLERANCE = 1e-4
LABEL_AGREEMENT_MIN = 0.999


def make_analyser(section: dict[str, Any]) -> Any:
    from dermpacs.config import Settings
    from dermpacs.inference.pipeline import Analyser

    return Analyser.from_settings(Settings.model_validate({"model": section}))


def reduced_target_long_side(analyser: Any, rows: int, columns: int) -> int:
    """The smallest long side at which every crop window is still at least the classifier's
    input size, and the analysis scale is not upsampled.

    The smallest window is ``min(window_fractions)`` of the short side; it is cut from the
    decoded photo and resized to ``crop_size``. Decoding smaller would enlarge crops and lose
    the skin texture the classifier sees at full resolution.
    """
    smallest_window = min(analyser.crop_settings.window_fractions)
    short_side_needed = analyser.crop_size / smallest_window
    aspect = max(rows, columns) / min(rows, columns)
    return max(analyser.long_side, math.ceil(short_side_needed * aspect))


def analyse_file(
    analyser: Any, data: bytes, *, reduced: bool, build: bool, errors: list[str] | None = None
) -> tuple[dict[str, float], Any, Any]:
    """Decode and analyse one DICOM photo; stage times (ms), the analysis, the decoded photo.

    A failure to build the result objects is appended to ``errors`` (when given) instead of
    raised, so that the method's own timings are still reported.
    """
    from dermpacs.imaging.decode import parse_dicom_file, read_photograph, read_photograph_scaled

    times: dict[str, float] = {}
    started = time.perf_counter()
    source = parse_dicom_file(data)
    times["parse"] = (time.perf_counter() - started) * 1000
    mark = time.perf_counter()
    if reduced:
        rows, columns = int(source.Rows), int(source.Columns)
        photo = read_photograph_scaled(
            source, target_long_side=reduced_target_long_side(analyser, rows, columns)
        )
        times["decode"] = (time.perf_counter() - mark) * 1000
        analysis = analyser.analyse(photo.rgb, source_shape=photo.source_shape)
    else:
        photo = read_photograph(source)
        times["decode"] = (time.perf_counter() - mark) * 1000
        analysis = analyser.analyse(photo.rgb)
    for stage, value in analysis.timings_ms.items():
        times[stage if stage != "total" else "analyse_total"] = value
    times["method_total"] = (time.perf_counter() - started) * 1000
    if build and not reduced:
        try:
            times.update(build_and_write(source, photo.rgb, analysis, analyser))
        except ValueError as exc:  # ResultBuildError, UnknownCodeError
            if errors is None:
                raise
            errors.append(f"{type(exc).__name__}: {exc}")
    return times, analysis, photo


def build_and_write(source: Any, rgb: np.ndarray, analysis: Any, analyser: Any) -> dict[str, float]:
    """Build SEG, SR and overlay as the worker does, and write them (fsync) to a temp folder;
    milliseconds for each builder, the three together, and the write."""
    from dermpacs.imaging import results
    from dermpacs.processing import write_result_objects

    times: dict[str, float] = {}
    originals = {
        name: getattr(results, name)
        for name in ("build_segmentation", "build_report", "build_overlay")
    }

    def timed(name: str, function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            mark = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                times[f"build_{name.removeprefix('build_')}"] = (time.perf_counter() - mark) * 1000

        return call

    for name, function in originals.items():
        setattr(results, name, timed(name, function))
    try:
        mark = time.perf_counter()
        objects = results.build_results(
            source,
            rgb,
            analysis,
            algorithm_version=analyser.model_version,
            class_names=list(analyser.classes),
        )
        times["results_seg_sr_overlay"] = (time.perf_counter() - mark) * 1000
    finally:
        for name, function in originals.items():
            setattr(results, name, function)
    with tempfile.TemporaryDirectory(prefix="dermpacs-bench-results-") as folder:
        mark = time.perf_counter()
        write_result_objects(objects.as_dict(), Path(folder))
        times["write_results_fsync"] = (time.perf_counter() - mark) * 1000
        times["results_bytes"] = float(sum(p.stat().st_size for p in Path(folder).iterdir()))
    return times


def median_times(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = samples[0].keys()
    return {k: round(statistics.median(s[k] for s in samples if k in s), 2) for k in keys}


def min_times(samples: list[dict[str, float]]) -> dict[str, float]:
    """The fastest of the repeats per stage: the least disturbed by other work on the machine."""
    keys = samples[0].keys()
    return {k: round(min(s[k] for s in samples if k in s), 2) for k in keys}


def time_classifier(analyser: Any, crops: int, repeats: int) -> float:
    """Milliseconds to classify ``crops`` crops in one batch (the most the rule keeps)."""
    rng = np.random.default_rng(0)
    size = analyser.crop_size
    batch = rng.integers(0, 256, size=(crops, size, size, 3), dtype=np.uint8)
    analyser.classify(batch)
    samples = []
    for _ in range(repeats):
        mark = time.perf_counter()
        analyser.classify(batch)
        samples.append((time.perf_counter() - mark) * 1000)
    return round(statistics.median(samples), 2)


def compare_analyses(a: Any, b: Any) -> dict[str, float]:
    """How far two analyses of the same photo are apart."""
    agree = float(np.mean(np.asarray(a.label_map) == np.asarray(b.label_map)))
    diff = max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities)
    return {
        "label_agreement": round(agree, 6),
        "probability_max_abs_diff": float(f"{diff:.3g}"),
        "same_finding": a.finding == b.finding,
        "crops": [len(a.crops), len(b.crops)],
    }


def compare_networks(eager: Any, ort: Any, photo_rgb: np.ndarray) -> dict[str, Any]:
    """Logits of both backends on one analysis-scale input and one batch of crops."""
    import torch

    from dermpacs.inference.crops import cut_whole_photo
    from dermpacs.inference.preprocessing import resize_photo, to_crop_batch, to_input_batch

    meta = eager.segmentation_metadata
    small = resize_photo(photo_rgb, eager.long_side)
    batch = to_input_batch([small], meta.mean, meta.std)
    with torch.inference_mode():
        reference = eager.segmentation(batch)
    exported = ort.segmentation(batch)
    seg_diff = float((reference - exported).abs().max())
    seg_agree = float((reference.argmax(1) == exported.argmax(1)).float().mean())
    crops = np.concatenate([cut_whole_photo(photo_rgb, eager.crop_size)] * 4)
    cmeta = eager.classifier_metadata
    crop_batch = to_crop_batch(crops, cmeta.mean, cmeta.std)
    with torch.inference_mode():
        cls_reference = eager.classifier(crop_batch)
    cls_diff = float((cls_reference - ort.classifier(crop_batch)).abs().max())
    return {
        "segmentation_logit_max_abs_diff": float(f"{seg_diff:.3g}"),
        "segmentation_logit_std": float(f"{float(reference.std()):.3g}"),
        "segmentation_label_agreement": round(seg_agree, 6),
        "classifier_logit_max_abs_diff": float(f"{cls_diff:.3g}"),
        "within_tolerance": seg_diff <= LOGIT_TOLERANCE
        and cls_diff <= LOGIT_TOLERANCE
        and seg_agree >= LABEL_AGREEMENT_MIN,
    }


def time_networks_interleaved(eager: Any, ort: Any, repeats: int) -> dict[str, Any]:
    """Both networks alone, eager PyTorch and ONNX Runtime taking turns call by call, so that
    a disturbance on the machine hits both alike: segmentation at the analysis scale (batch 1)
    and the classifier on ``max_crops`` crops. Milliseconds, fastest and median."""
    import torch

    rows = eager.long_side * 3 // 4 // 32 * 32
    image = torch.randn(1, 3, rows, eager.long_side)
    crops = torch.randn(eager.crop_settings.max_crops, 3, eager.crop_size, eager.crop_size)
    calls = {
        "segmentation_eager": lambda: eager.segmentation(image),
        "segmentation_onnxruntime": lambda: ort.segmentation(image),
        "classifier_eager": lambda: eager.classifier(crops),
        "classifier_onnxruntime": lambda: ort.classifier(crops),
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()
        for _ in range(max(repeats, 3) * 3):
            for name, call in calls.items():
                mark = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - mark) * 1000)
    return {
        "input": [1, 3, rows, eager.long_side],
        "crops": int(crops.shape[0]),
        "calls_each": len(samples["segmentation_eager"]),
        **{
            name: {"min_ms": round(min(v), 1), "median_ms": round(statistics.median(v), 1)}
            for name, v in samples.items()
        },
    }


def time_torch_compile(analyser: Any, repeats: int) -> dict[str, Any]:
    """Eager vs ``torch.compile`` (inductor) segmentation at the analysis scale, batch 1."""
    import torch

    rows = analyser.long_side * 3 // 4 // 32 * 32
    example = torch.randn(1, 3, rows, analyser.long_side)
    model = analyser.segmentation
    with torch.inference_mode():
        reference = model(example)
        started = time.perf_counter()
        compiled = torch.compile(model)
        first = compiled(example)
        compile_s = time.perf_counter() - started

        def timed(function: Any) -> float:
            function(example)
            samples = []
            for _ in range(repeats):
                mark = time.perf_counter()
                function(example)
                samples.append((time.perf_counter() - mark) * 1000)
            return round(statistics.median(samples), 2)

        eager_ms = timed(model)
        compiled_ms = timed(compiled)
    return {
        "input": [1, 3, rows, analyser.long_side],
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "compile_and_first_call_s": round(compile_s, 1),
        "logit_max_abs_diff": float(f"{float((reference - first).abs().max()):.3g}"),
        "note": "compiled again for every new padded input size (photo orientation, aspect)",
    }


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB.

    ``VmHWM`` of /proc/self/status: unlike ``ru_maxrss``, which Linux carries over from the
    parent across fork and exec (a child of a 1 GB process starts with a 1 GB "peak"), it
    belongs to this program's own address space.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_rss(
    size: str, *, reduced: bool, backend: str, onnx_dir: Path | None = None
) -> dict[str, Any]:
    """In this (fresh) process: load models, then decode, analyse and build one photo.

    With ONNX Runtime the sessions are made from the files exported earlier (``onnx_dir``),
    as a worker would load shipped .onnx files: the export's own memory is not counted.
    """
    model = choose_model()
    analyser = make_analyser(model.section)
    if backend == "onnxruntime":
        from bench.onnx_backend import onnx_analyser

        if onnx_dir is None:
            raise ValueError("onnx_dir: the exported networks are needed")
        analyser = onnx_analyser(analyser, onnx_dir, export=False)
    data = inputs.input_file("camera", size).read_bytes()
    loaded = peak_rss_mib()
    errors: list[str] = []
    samples = [
        analyse_file(analyser, data, reduced=reduced, build=True, errors=errors)[0]
        for _ in range(2)
    ]
    peak = peak_rss_mib()
    return {
        "size": size,
        "decode": "reduced" if reduced else "full",
        "backend": backend,
        "rss_models_loaded_mib": round(loaded, 1),
        "peak_rss_mib": round(peak, 1),
        "method_total_ms_second_photo": round(samples[-1]["method_total"], 1),
    }


def measure_rss(
    size: str, *, reduced: bool, backend: str, onnx_dir: Path | None = None
) -> dict[str, Any]:
    """Run :func:`worker_rss` in a fresh interpreter, so each peak is its own."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.inference",
            "--worker-rss",
            size,
            "--decode",
            "reduced" if reduced else "full",
            "--backend",
            backend,
            *(["--onnx-dir", str(onnx_dir)] if onnx_dir else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker-rss {size} failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def numpy_peak(analyser: Any, data: bytes, *, reduced: bool) -> float:
    """Peak of memory traced by tracemalloc (Python objects and numpy arrays, not torch)."""
    import tracemalloc

    tracemalloc.start()
    try:
        analyse_file(analyser, data, reduced=reduced, build=not reduced, errors=[])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return round(peak / 2**20, 1)


def run_inference(
    *,
    short: bool = False,
    repeats: int | None = None,
    sizes: Sequence[str] | None = None,
    compile_check: bool | None = None,
    rss: bool | None = None,
) -> dict[str, Any]:
    """Run the inference benchmark; returns a JSON-ready result."""
    import torch

    started = time.time()
    repeats = repeats or (1 if short else 5)
    sizes = list(sizes or (("1mp",) if short else SIZES))
    compile_check = (not short) if compile_check is None else compile_check
    rss = (not short) if rss is None else rss
    model = choose_model()
    eager = make_analyser(model.section)
    folder = Path(tempfile.mkdtemp(prefix="dermpacs-bench-onnx-"))
    # the exported networks are needed until the last memory run; gone when this process ends
    atexit.register(shutil.rmtree, folder, True)
    export_started = time.perf_counter()
    from bench.onnx_backend import onnx_analyser

    ort = onnx_analyser(eager, folder)
    export_s = time.perf_counter() - export_started
    backends = {"eager": eager, "onnxruntime": ort}
    rows: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    for size in sizes:
        path = inputs.input_file("camera", size)
        data = path.read_bytes()
        described = inputs.describe_file(path)
        analyses: dict[tuple[str, str], Any] = {}
        for backend, analyser in backends.items():
            for decode in ("full", "reduced"):
                reduced = decode == "reduced"
                analyse_file(analyser, data, reduced=reduced, build=False)  # warm-up
                samples = []
                errors: list[str] = []
                for _ in range(repeats):
                    times, analysis, photo = analyse_file(
                        analyser, data, reduced=reduced, build=True, errors=errors
                    )
                    samples.append(times)
                analyses[(backend, decode)] = analysis
                rows.append(
                    {
                        "size": size,
                        "megapixels": round(inputs.SIZES[size].megapixels, 2),
                        "file_bytes": described["file_bytes"],
                        "backend": backend,
                        "decode": decode,
                        "decoded_shape": list(photo.rgb.shape[:2]),
                        "crops": len(analysis.crops),
                        "whole_image_fallback": analysis.whole_image_fallback,
                        "ms": median_times(samples),
                        "ms_min": min_times(samples),
                        "results_error": errors[0] if errors else None,
                    }
                )
        photo_rgb = _full_rgb(data)
        checks[size] = {
            "onnxruntime_vs_eager_networks": compare_networks(eager, ort, photo_rgb),
            "onnxruntime_vs_eager_method_full_decode": compare_analyses(
                analyses[("eager", "full")], analyses[("onnxruntime", "full")]
            ),
            "reduced_vs_full_decode_eager": compare_analyses(
                analyses[("eager", "full")], analyses[("eager", "reduced")]
            ),
        }
        if not short:
            checks[size]["traced_python_numpy_peak_mib"] = {
                "full": numpy_peak(eager, data, reduced=False),
                "reduced": numpy_peak(eager, data, reduced=True),
            }
    max_crops = eager.crop_settings.max_crops
    classifier_ms = {
        f"{backend}_{count}_crops": time_classifier(analyser, count, repeats)
        for backend, analyser in backends.items()
        for count in (1, max_crops)
        if not short
    }
    networks = time_networks_interleaved(eager, ort, 1 if short else repeats)
    compile_result = time_torch_compile(eager, repeats) if compile_check else None
    memory = []
    if rss:
        for size in sizes:
            memory.append(measure_rss(size, reduced=False, backend="eager"))
            memory.append(measure_rss(size, reduced=True, backend="onnxruntime", onnx_dir=folder))
    largest = sizes[-1]
    best = min(
        (r for r in rows if r["size"] == largest),
        key=lambda r: r["ms"]["method_total"],
    )
    baseline = next(
        r
        for r in rows
        if r["size"] == largest and r["backend"] == "eager" and r["decode"] == "full"
    )
    return {
        "benchmark": "inference",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "repeats": repeats,
        "short": short,
        "model": model.description,
        "model_trained": model.trained,
        "analysis_long_side": eager.long_side,
        "crop_size": eager.crop_size,
        "torch_threads": torch.get_num_threads(),
        "onnx_export_s": round(export_s, 1),
        "tolerances": {
            "logit_max_abs_diff": LOGIT_TOLERANCE,
            "probability_max_abs_diff": PROBABILITY_TOLERANCE,
            "label_agreement_min": LABEL_AGREEMENT_MIN,
        },
        "rows": rows,
        "classifier_batch_ms": classifier_ms,
        "networks_interleaved": networks,
        "checks": checks,
        "torch_compile": compile_result,
        "worker_memory": memory,
        "target": {
            "size": largest,
            "seconds": METHOD_TARGET_SECONDS,
            "baseline_ms_median": baseline["ms"]["method_total"],
            "baseline_ms_min": baseline["ms_min"]["method_total"],
            "best_ms_median": best["ms"]["method_total"],
            "best_ms_min": best["ms_min"]["method_total"],
            "best_variant": f"{best['backend']}, {best['decode']} decode",
            "met": best["ms"]["method_total"] < METHOD_TARGET_SECONDS * 1000,
        },
        "machine": machine_facts(),
    }


def _full_rgb(data: bytes) -> np.ndarray:
    from dermpacs.imaging.decode import read_photograph_bytes

    return np.asarray(read_photograph_bytes(data).rgb)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="one small photo, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sizes", default="", help="comma-separated: 1mp,4mp,12mp")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-process memory runs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker-rss", default="", help=argparse.SUPPRESS)
    parser.add_argument("--decode", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="eager", help=argparse.SUPPRESS)
    parser.add_argument("--onnx-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    if args.worker_rss:
        result = worker_rss(
            args.worker_rss,
            reduced=args.decode == "reduced",
            backend=args.backend,
            onnx_dir=args.onnx_dir,
        )
        print(json.dumps(result))
        return 0
    result = run_inference(
        short=args.short,
        repeats=args.repeats,
        sizes=[s for s in args.sizes.split(",") if s] or None,
        compile_check=False if args.no_compile else None,
        rss=False if args.no_rss else None,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
