"""GPU: batched inference throughput (photos/s at batch 1, 8 and 32) and how busy the card is.

Two figures per batch size, on the same synthetic clinical photos (4:3, from
:mod:`dermpacs.training.synth`, no DICOM tools needed on the GPU machine):

* ``networks``: the segmentation network on a batch at the analysis scale plus the classifier
  on ``max_crops`` crops per photo, inputs already on the card; FP32 (TF32 matmuls allowed,
  as PyTorch's default for convolutions) and, with ``--amp``, bfloat16 autocast;
* ``method``: :meth:`Analyser.analyse_batch` on the photos as RGB arrays in host memory, which
  is what the worker runs: resize and normalisation on the CPU, segmentation, the label map at
  the source's size, crop rule, crops, classification, skin tone, quality.

While each measurement runs, ``nvidia-smi`` samples the card's utilisation every 100 ms (the
share of time a kernel was running) and memory; the FLOP counter of
:func:`dermpacs.inference.networks.count_multiply_adds` gives the work per photo, so the result
also states the achieved TFLOP/s beside the card's dense peak where the card is known.

Run it where CUDA works, from the repository root::

    python -m bench.gpu_inference --out gpu.json            # about 2 minutes on an H100
    python -m bench.gpu_inference --amp --photo-size 4000   # 12-MP photos, bfloat16 too

``--device cpu`` runs the same code on the CPU (slowly; a harness check).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

# Dense peak TFLOP/s by card (NVIDIA data sheets, SXM): FP32, TF32 and BF16 tensor cores.
PEAK_TFLOPS = {
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}


class GpuSampler:
    """``nvidia-smi`` utilisation and memory, sampled every 100 ms while active."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi") is None:
            return self
        self._process = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "100",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                continue

    def __exit__(self, *_: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
        if self._thread is not None:
            self._thread.join(5)

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {"utilisation_mean_pct": None, "memory_used_max_mib": None}
        busy = [s[0] for s in self.samples]
        return {
            "utilisation_mean_pct": round(statistics.fmean(busy), 1),
            "utilisation_max_pct": max(busy),
            "memory_used_max_mib": max(s[1] for s in self.samples),
            "samples": len(self.samples),
        }


def synthetic_photos(count: int, long_side: int) -> list[np.ndarray]:
    """``count`` landscape 4:3 clinical-like photos of ``long_side`` pixels."""
    from PIL import Image

    from dermpacs.training.synth import generate_photo

    base = []
    index = 0
    while len(base) < min(count, 4):
        photo = generate_photo(7, index, long_side=min(long_side, 1024))
        index += 1
        if photo.image.shape[1] > photo.image.shape[0]:
            base.append(photo.image)
    rows = long_side * 3 // 4
    photos = []
    for i in range(count):
        image = base[i % len(base)]
        if image.shape[:2] != (rows, long_side):
            image = np.asarray(
                Image.fromarray(image).resize((long_side, rows), Image.Resampling.BILINEAR)
            )
        photos.append(np.ascontiguousarray(image))
    return photos


def card_peak(name: str) -> dict[str, float] | None:
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def run_gpu(
    *,
    device: str = "cuda",
    batches: Sequence[int] = (1, 8, 32),
    photo_long_side: int = 2048,
    repeats: int = 10,
    amp: bool = False,
) -> dict[str, Any]:
    import torch

    from bench.machine import machine_facts
    from bench.models import choose_model
    from dermpacs.config import Settings
    from dermpacs.inference.networks import count_multiply_adds
    from dermpacs.inference.pipeline import Analyser, resolve_device

    target = resolve_device(device)
    if target.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = choose_model()
    settings = Settings.model_validate({"model": {**model.section, "device": str(target)}})
    # PyTorch on the card (AMP, TF32); on the CPU too, so that the FLOP count below can hook
    # the modules (the worker would take ONNX Runtime there: bench/inference.py measures it).
    analyser = Analyser.from_settings(settings, device=str(target), runtime="torch")
    long_side, crop = analyser.long_side, analyser.crop_size
    rows = long_side * 3 // 4 // 32 * 32
    crops_per_photo = analyser.crop_settings.max_crops
    seg_macs = count_multiply_adds(analyser.segmentation.cpu(), (1, 3, rows, long_side))
    cls_macs = count_multiply_adds(analyser.classifier.cpu(), (1, 3, crop, crop))
    analyser.segmentation.to(target)
    analyser.classifier.to(target)
    flops_per_photo = 2 * (seg_macs + crops_per_photo * cls_macs)
    name = torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu"
    peak = card_peak(name)

    def synchronise() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    def timed(function: Any) -> tuple[float, dict[str, Any]]:
        function()  # warm-up (cuDNN picks its algorithms)
        function()
        synchronise()
        with GpuSampler() as sampler:
            started = time.perf_counter()
            for _ in range(repeats):
                function()
            synchronise()
            elapsed = (time.perf_counter() - started) / repeats
        return elapsed, sampler.summary()

    results: list[dict[str, Any]] = []
    photos = synthetic_photos(max(batches), photo_long_side)
    for batch in batches:
        images = torch.randn(batch, 3, rows, long_side, device=target)
        crops = torch.randn(batch * crops_per_photo, 3, crop, crop, device=target)
        precisions = ["fp32"] + (["bf16"] if amp and target.type == "cuda" else [])
        for precision in precisions:

            def networks(
                images: Any = images, crops: Any = crops, precision: str = precision
            ) -> None:
                with (
                    torch.inference_mode(),
                    torch.autocast(
                        device_type=target.type,
                        dtype=torch.bfloat16,
                        enabled=precision == "bf16",
                    ),
                ):
                    analyser.segmentation(images)
                    analyser.classifier(crops)

            seconds, gpu = timed(networks)
            rate = batch / seconds
            achieved = rate * flops_per_photo / 1e12
            key = "tf32" if precision == "fp32" else precision
            results.append(
                {
                    "what": "networks",
                    "batch": batch,
                    "precision": precision,
                    "ms_per_batch": round(seconds * 1000, 2),
                    "photos_per_second": round(rate, 1),
                    "achieved_tflops": round(achieved, 2),
                    "share_of_peak": round(achieved / peak[key], 4) if peak else None,
                    "gpu": gpu,
                }
            )
        batch_photos = photos[:batch]
        if target.type == "cuda":
            torch.cuda.reset_peak_memory_stats(target)
        seconds, gpu = timed(lambda batch_photos=batch_photos: analyser.analyse_batch(batch_photos))
        results.append(
            {
                "what": "method",
                "batch": batch,
                "precision": "fp32",
                "photo_shape": list(batch_photos[0].shape[:2]),
                "ms_per_batch": round(seconds * 1000, 2),
                "photos_per_second": round(batch / seconds, 2),
                "torch_peak_memory_mib": (
                    round(torch.cuda.max_memory_allocated(target) / 2**20, 1)
                    if target.type == "cuda"
                    else None
                ),
                "gpu": gpu,
            }
        )
    return {
        "benchmark": "gpu_inference",
        "device": name,
        "model": model.description,
        "analysis_input": [rows, long_side],
        "crops_per_photo": crops_per_photo,
        "gflops_per_photo": round(flops_per_photo / 1e9, 2),
        "peak_tflops": peak,
        "repeats": repeats,
        "results": results,
        "machine": machine_facts(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (harness check)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--photo-size", type=int, default=2048, help="photo long side, pixels")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--amp", action="store_true", help="also bfloat16 autocast")
    parser.add_argument("--out", default="", help="write the JSON result here")
    args = parser.parse_args(argv)
    try:
        result = run_gpu(
            device=args.device,
            batches=[int(b) for b in args.batches.split(",") if b],
            photo_long_side=args.photo_size,
            repeats=args.repeats,
            amp=args.amp,
        )
    except ValueError as exc:  # no CUDA here
        print(f"gpu_inference: {exc}")
        return 2
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
