"""Inference: milliseconds per photo for each stage of the worker, at 1, 4 and 12 megapixels.

For camera photos (img2dcm JPEG) of each size, one photo at a time as a worker takes them, the
stages of :func:`dermpacs.processing.build_job_results` timed one by one -- parse, decode, the
Analyser's own stages (resize to the analysis scale, segmentation, the mask at the source's
size, crops, classification, skin tone, quality), the result objects (SEG, SR, overlay) and
writing them with fsync -- for three variants in the same run:

* ``old``: what the worker ran before the fast path, the baseline: eager PyTorch on the full
  decode (``model.runtime = "torch"``, no preview). Its result objects are built by today's
  imaging code, so it isolates the inference side;
* ``onnx``: ONNX Runtime on the full decode, no preview: what the worker runs by default;
* ``worker``: the worker with ``model.reduced_decode = true``
  (:func:`dermpacs.processing.read_for_analysis`): ONNX Runtime, the segmentation input from
  the codec's reduced-scale decode, crops and overlay from the full decode.

Also: the ONNX export at first use and a load from the cache; the networks alone (eager and
ONNX Runtime taking turns call by call); the results of the variants compared (labels,
probabilities, finding); ``torch.compile`` on the segmentation network; batch 4 against batch
1 on this CPU; and the peak resident memory of a worker-like process per variant and size
(fresh process: models loaded from the cache, then the same photo twice through the whole
path, results written).
"""

from __future__ import annotations

import argparse
import atexit
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import inputs
from bench.cli import exit_on_sigterm, write_result
from bench.machine import machine_facts
from bench.models import choose_model
from bench.services import REPO

SIZES = ("1mp", "4mp", "12mp")
METHOD_TARGET_SECONDS = 0.5  # issue 7: the whole method under 0.5 s per 12-MP photo
# Stated tolerances for "equal" (docs/model-card.md; tests/test_runtime.py checks them).
LOGIT_TOLERANCE = 1e-3
ONNX_LABEL_AGREEMENT_MIN = 0.9999
ONNX_PROBABILITY_TOLERANCE = 1e-4
PREVIEW_LABEL_AGREEMENT_MIN = 0.995
PREVIEW_PROBABILITY_TOLERANCE = 0.02

VARIANTS: dict[str, dict[str, Any]] = {
    "old": {"runtime": "torch", "preview": False, "what": "eager PyTorch, full decode"},
    "onnx": {
        "runtime": "onnx",
        "preview": False,
        "what": "ONNX Runtime, full decode (the worker as configured by default)",
    },
    "worker": {
        "runtime": "onnx",
        "preview": True,
        "what": "ONNX Runtime, segmentation input from the reduced decode "
        "(the worker with model.reduced_decode = true)",
    },
}
# The stages that make "the method" (up to the findings) and the whole worker path.
METHOD_STAGES = ("parse", "decode", "analyse_total")
RESULT_STAGES = ("build_segmentation", "build_report", "build_overlay")


def bench_settings(section: dict[str, Any], storage_root: Path) -> Any:
    from dermpacs.config import Settings

    return Settings.model_validate({"model": section, "storage": {"root": str(storage_root)}})


def make_analyser(settings: Any, runtime: str) -> Any:
    from dermpacs.inference.pipeline import Analyser

    return Analyser.from_settings(settings, runtime=runtime)


def run_worker_path(
    analyser: Any, settings: Any, data: bytes, *, preview: bool, folder: Path
) -> tuple[dict[str, float], Any, Any]:
    """One photo through the worker's path, each stage timed (ms); the analysis and photo.

    The steps are those of :func:`dermpacs.processing.build_job_results`, called one by one.
    """
    from dermpacs.imaging import results
    from dermpacs.imaging.decode import parse_dicom_file, read_photograph
    from dermpacs.processing import read_for_analysis, write_result_objects

    times: dict[str, float] = {}
    started = time.perf_counter()
    source = parse_dicom_file(data)
    mark = times_since(times, "parse", started)
    if preview:
        photo = read_for_analysis(source, settings, analyser, reduced=True)
        mark = times_since(times, "decode", mark)
        analysis = analyser.analyse(photo.rgb, preview=photo.preview)
    else:
        photo = read_photograph(source, max_megapixels=settings.intake.max_megapixels)
        mark = times_since(times, "decode", mark)
        analysis = analyser.analyse(photo.rgb)
    mark = times_since(times, "analyse_total", mark)
    for stage, value in analysis.timings_ms.items():
        if stage != "total":
            times[stage] = value
    times["method_total"] = (mark - started) * 1000
    with timed_builders(results, times):
        objects = results.build_results(
            source,
            photo.rgb,
            analysis,
            algorithm_version=analyser.model_version,
            class_names=list(analyser.classes),
        )
    mark = times_since(times, "results_total", mark)
    write_result_objects(objects.as_dict(), folder)
    mark = times_since(times, "write_fsync", mark)
    times["results_bytes"] = float(sum(p.stat().st_size for p in folder.iterdir()))
    times["worker_total"] = (mark - started) * 1000
    return times, analysis, photo


def times_since(times: dict[str, float], stage: str, since: float) -> float:
    now = time.perf_counter()
    times[stage] = (now - since) * 1000
    return now


class timed_builders:  # noqa: N801 - used as a context manager, like a function
    """Time SEG, SR and overlay building inside ``build_results`` (patched for the call)."""

    def __init__(self, module: Any, times: dict[str, float]) -> None:
        self.module, self.times = module, times
        self.originals = {name: getattr(module, name) for name in RESULT_STAGES}

    def __enter__(self) -> None:
        for name, function in self.originals.items():
            setattr(self.module, name, self._wrap(name, function))

    def __exit__(self, *exc: object) -> None:
        for name, function in self.originals.items():
            setattr(self.module, name, function)

    def _wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            mark = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.times[name] = (time.perf_counter() - mark) * 1000

        return call


def median_times(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = samples[0].keys()
    return {k: round(statistics.median(s[k] for s in samples if k in s), 2) for k in keys}


def min_times(samples: list[dict[str, float]]) -> dict[str, float]:
    """The fastest of the repeats per stage: the least disturbed by other work on the machine."""
    keys = samples[0].keys()
    return {k: round(min(s[k] for s in samples if k in s), 2) for k in keys}


def compare_analyses(a: Any, b: Any) -> dict[str, Any]:
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
    """Logits of both runtimes on one analysis-scale input and one batch of crops."""
    import torch

    from dermpacs.inference.crops import cut_whole_photo
    from dermpacs.inference.preprocessing import resize_photo, to_crop_batch, to_input_batch

    meta = eager.segmentation_metadata
    batch = to_input_batch([resize_photo(photo_rgb, eager.long_side)], meta.mean, meta.std)
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
        and seg_agree >= ONNX_LABEL_AGREEMENT_MIN,
    }


def within(comparison: dict[str, Any], agreement: float, tolerance: float) -> bool:
    return bool(
        comparison["label_agreement"] >= agreement
        and comparison["probability_max_abs_diff"] <= tolerance
        and comparison["same_finding"]
    )


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


def time_batching(analyser: Any, settings: Any, data: bytes, repeats: int) -> dict[str, Any]:
    """The Analyser on 4 photos: ``analyse_batch`` (one segmentation batch of 4, one
    classification batch) against four ``analyse`` calls, taking turns; ms per photo."""
    from dermpacs.imaging.decode import parse_dicom_file
    from dermpacs.processing import read_for_analysis

    photo = read_for_analysis(parse_dicom_file(data), settings, analyser, reduced=True)
    photos, previews = [photo.rgb] * 4, [photo.preview] * 4

    def together() -> None:
        analyser.analyse_batch(photos, previews=previews)

    def one_by_one() -> None:
        for rgb, preview in zip(photos, previews, strict=True):
            analyser.analyse(rgb, preview=preview)

    samples: dict[str, list[float]] = {"batch_4": [], "batch_1": []}
    together()
    one_by_one()
    for _ in range(max(repeats, 2)):
        for name, call in (("batch_4", together), ("batch_1", one_by_one)):
            mark = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - mark) * 1000 / 4)
    return {
        "photos": 4,
        "decoded_shape": list(photo.rgb.shape[:2]),
        **{
            name: {"min_ms": round(min(v), 1), "median_ms": round(statistics.median(v), 1)}
            for name, v in samples.items()
        },
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


def worker_rss(size: str, variant: str, storage_root: Path) -> dict[str, Any]:
    """In this (fresh) process: load models (ONNX files from the cache filled earlier), then
    take the same photo twice through the whole worker path, results written."""
    spec = VARIANTS[variant]
    settings = bench_settings(choose_model().section, storage_root)
    analyser = make_analyser(settings, spec["runtime"])
    data = inputs.input_file("camera", size).read_bytes()
    loaded = peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="dermpacs-bench-results-") as folder:
        samples = [
            run_worker_path(analyser, settings, data, preview=spec["preview"], folder=Path(folder))[
                0
            ]
            for _ in range(2)
        ]
    return {
        "size": size,
        "variant": variant,
        "rss_models_loaded_mib": round(loaded, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "worker_total_ms_second_photo": round(samples[-1]["worker_total"], 1),
    }


def measure_rss(size: str, variant: str, storage_root: Path) -> dict[str, Any]:
    """Run :func:`worker_rss` in a fresh interpreter, so each peak is its own."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.inference",
            "--worker-rss",
            size,
            "--variant",
            variant,
            "--storage-root",
            str(storage_root),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker-rss {size} {variant} failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


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
    storage_root = Path(tempfile.mkdtemp(prefix="dermpacs-bench-storage-"))
    # the ONNX cache is needed until the last memory run; gone when this process ends
    atexit.register(shutil.rmtree, storage_root, True)
    settings = bench_settings(model.section, storage_root)
    eager = make_analyser(settings, "torch")
    mark = time.perf_counter()
    ort = make_analyser(settings, "onnx")  # first use: exports both networks into the cache
    export_s = time.perf_counter() - mark
    mark = time.perf_counter()
    make_analyser(settings, "onnx")
    cached_s = time.perf_counter() - mark
    analysers = {"torch": eager, "onnx": ort}
    rows: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    results_folder = Path(tempfile.mkdtemp(prefix="dermpacs-bench-results-"))
    atexit.register(shutil.rmtree, results_folder, True)
    for size in sizes:
        path = inputs.input_file("camera", size)
        data = path.read_bytes()
        described = inputs.describe_file(path)
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
        analyses: dict[str, Any] = {}
        photos: dict[str, Any] = {}

        def one(name: str, data: bytes = data) -> tuple[dict[str, float], Any, Any]:
            spec = VARIANTS[name]
            return run_worker_path(
                analysers[spec["runtime"]],
                settings,
                data,
                preview=spec["preview"],
                folder=results_folder / name,
            )

        for name in VARIANTS:
            one(name)  # warm-up
        # The variants take turns within each repeat, so a disturbance hits all alike.
        for _ in range(repeats):
            for name in VARIANTS:
                times, analyses[name], photos[name] = one(name)
                samples[name].append(times)
        for name, spec in VARIANTS.items():
            photo = photos[name]
            rows.append(
                {
                    "size": size,
                    "megapixels": round(inputs.SIZES[size].megapixels, 2),
                    "file_bytes": described["file_bytes"],
                    "variant": name,
                    "what": spec["what"],
                    "runtime": spec["runtime"],
                    "decoded_shape": list(photo.rgb.shape[:2]),
                    "preview_shape": (
                        list(photo.preview.shape[:2]) if photo.preview is not None else None
                    ),
                    "crops": len(analyses[name].crops),
                    "whole_image_fallback": analyses[name].whole_image_fallback,
                    "ms": median_times(samples[name]),
                    "ms_min": min_times(samples[name]),
                }
            )
        onnx_vs_old = compare_analyses(analyses["old"], analyses["onnx"])
        worker_vs_old = compare_analyses(analyses["old"], analyses["worker"])
        checks[size] = {
            "onnxruntime_vs_eager_networks": compare_networks(eager, ort, photos["old"].rgb),
            "onnx_vs_old": {
                **onnx_vs_old,
                "within_tolerance": within(
                    onnx_vs_old, ONNX_LABEL_AGREEMENT_MIN, ONNX_PROBABILITY_TOLERANCE
                ),
            },
            "worker_vs_old": {
                **worker_vs_old,
                "within_tolerance": within(
                    worker_vs_old, PREVIEW_LABEL_AGREEMENT_MIN, PREVIEW_PROBABILITY_TOLERANCE
                ),
            },
        }
    networks = time_networks_interleaved(eager, ort, 1 if short else repeats)
    batching = None
    if not short:
        batch_size = "4mp" if "4mp" in sizes else sizes[-1]
        batching = {
            "size": batch_size,
            **time_batching(
                ort, settings, inputs.input_file("camera", batch_size).read_bytes(), repeats
            ),
        }
    compile_result = time_torch_compile(eager, repeats) if compile_check else None
    memory = []
    if rss:
        for size in sizes:
            for name in ("old", "onnx", "worker"):
                memory.append(measure_rss(size, name, storage_root))
    largest = sizes[-1]

    def row(size: str, variant: str) -> dict[str, Any]:
        return next(r for r in rows if r["size"] == size and r["variant"] == variant)

    # The target is judged on the worker as it runs by default (ONNX Runtime, full decode).
    baseline, worker = row(largest, "old"), row(largest, "onnx")
    return {
        "benchmark": "inference",
        "format": 2,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "repeats": repeats,
        "short": short,
        "model": model.description,
        "model_trained": model.trained,
        "analysis_long_side": eager.long_side,
        "crop_size": eager.crop_size,
        "torch_threads": torch.get_num_threads(),
        "onnx_export_first_use_s": round(export_s, 1),
        "onnx_load_from_cache_s": round(cached_s, 2),
        "variants": {name: spec["what"] for name, spec in VARIANTS.items()},
        "tolerances": {
            "logit_max_abs_diff": LOGIT_TOLERANCE,
            "onnx_label_agreement_min": ONNX_LABEL_AGREEMENT_MIN,
            "onnx_probability_max_abs_diff": ONNX_PROBABILITY_TOLERANCE,
            "preview_label_agreement_min": PREVIEW_LABEL_AGREEMENT_MIN,
            "preview_probability_max_abs_diff": PREVIEW_PROBABILITY_TOLERANCE,
        },
        "rows": rows,
        "networks_interleaved": networks,
        "batching": batching,
        "checks": checks,
        "torch_compile": compile_result,
        "worker_memory": memory,
        "target": {
            "size": largest,
            "seconds": METHOD_TARGET_SECONDS,
            "baseline_ms_median": baseline["ms"]["method_total"],
            "baseline_ms_min": baseline["ms_min"]["method_total"],
            "worker_ms_median": worker["ms"]["method_total"],
            "worker_ms_min": worker["ms_min"]["method_total"],
            "met": worker["ms"]["method_total"] < METHOD_TARGET_SECONDS * 1000,
        },
        "machine": machine_facts(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="one small photo, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sizes", default="", help="comma-separated: 1mp,4mp,12mp")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-process memory runs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker-rss", default="", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="worker", help=argparse.SUPPRESS)
    parser.add_argument("--storage-root", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    if args.worker_rss:
        if args.storage_root is None:
            parser.error("--worker-rss needs --storage-root (the ONNX cache)")
        print(json.dumps(worker_rss(args.worker_rss, args.variant, args.storage_root)))
        return 0
    result = run_inference(
        short=args.short,
        repeats=args.repeats,
        sizes=[s for s in args.sizes.split(",") if s] or None,
        compile_check=False if args.no_compile else None,
        rss=False if args.no_rss else None,
    )
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
