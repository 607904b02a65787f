"""Where the two networks' forward passes run: eager PyTorch, or ONNX Runtime on the CPU.

``model.runtime`` chooses (:func:`resolve_runtime`): ``torch`` runs the networks as loaded;
``onnx`` runs them in ONNX Runtime's CPU provider, which folds batch normalisation into the
convolutions and fuses activations, and whose thread pool keeps its pace on a CPU that other
work shares (eager PyTorch's OpenMP threads wait at every layer for a thread the scheduler has
given away: docs/benchmarks.md); ``auto`` takes ONNX Runtime on the CPU when it imports and
PyTorch on CUDA.

The ONNX files are made here from the loaded (and verified) safetensors weights the first time
they are needed, never downloaded: :func:`onnx_network` exports the network with dynamic batch
(and height and width for segmentation), checks ONNX Runtime's output against PyTorch's on the
export example, and keeps the file in a cache folder (``<storage.root>/models/onnx``) under a
name made of the weights' SHA-256 and the export's own version, written atomically (temporary
file, fsync, rename), so that worker processes starting together, or weights replaced under
the same file name, never read a half-written or stale graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Final, Literal

import numpy as np
import torch
from torch import nn

from dermpacs.inference.weights import WeightsError, WeightsMetadata

logger = logging.getLogger(__name__)

Runtime = Literal["torch", "onnx"]
RUNTIMES: Final = ("auto", "torch", "onnx")
ONNX_OPSET: Final = 17
EXPORT_FORMAT: Final = "dermpacs-onnx/1"
"""Changes whenever the export changes (opset, axes, names), so that old cached files are not
reused by code that expects another graph."""
ONNX_CACHE_DIRNAME: Final = Path("models") / "onnx"
# ONNX Runtime against eager PyTorch on the export example: outputs (logits) may differ by
# float rounding of fused operations only; measured differences are ~1e-5 on logits of std ~5.
EXPORT_RTOL: Final = 1e-3
EXPORT_ATOL: Final = 1e-3


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` imports in this environment."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_runtime(name: str, device: torch.device) -> Runtime:
    """The runtime ``model.runtime = name`` means on ``device``.

    Raises
    ------
    ValueError
        An unknown name; ``onnx`` on a CUDA device (the ONNX path runs on the CPU only); or
        ``onnx`` where onnxruntime does not import.
    """
    if name not in RUNTIMES:
        raise ValueError(f"model.runtime must be one of {', '.join(RUNTIMES)}, got {name!r}")
    if name == "torch":
        return "torch"
    if device.type != "cpu":
        if name == "onnx":
            raise ValueError(
                f"model.runtime is 'onnx' but model.device is {device}: the ONNX Runtime path "
                "runs on the CPU only (use runtime 'torch' or 'auto' on CUDA)"
            )
        return "torch"
    if onnxruntime_available():
        return "onnx"
    if name == "onnx":
        raise ValueError("model.runtime is 'onnx' but the onnxruntime package does not import")
    logger.warning("onnxruntime does not import; the networks run in eager PyTorch on the CPU")
    return "torch"


class OrtNetwork(nn.Module):
    """A forward pass in ONNX Runtime (CPU) behind the ``nn.Module`` call the Analyser makes.

    Parameters
    ----------
    path
        The ``.onnx`` file.
    threads
        Intra-op threads; by default as many as PyTorch uses in this process
        (``torch.get_num_threads()``, which follows ``OMP_NUM_THREADS``, set per pool process
        by the worker), so that several worker processes share the cores instead of each
        taking all of them.
    """

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # The CPU memory arena stays on: without it a 12-MP photo's worker peaked ~100 MiB
        # lower (750 against 850 MiB) but segmentation took about 1.5 times as long here.
        # No spinning between runs: idle threads spinning after each forward pass would take
        # cores from the rest of the pipeline (decode, mask, result objects) and other work.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        (output,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(output)


def export_example(metadata: WeightsMetadata) -> torch.Tensor:
    """The input the network is traced with: a 4:3 landscape photo at the analysis scale
    (segmentation), or two crops (classifier). Sizes stay dynamic in the graph."""
    side = metadata.input_size
    if metadata.kind == "segmentation":
        return torch.zeros(1, 3, max(32, side * 3 // 4 // 32 * 32), side)
    return torch.zeros(2, 3, side, side)


def cache_key(metadata: WeightsMetadata) -> str:
    """The cached file's key: the weights' SHA-256 (of the tensors, verified on load), the
    architecture that rebuilds them, and the export format."""
    described = {
        "payload_sha256": metadata.payload_sha256,
        "architecture": metadata.architecture,
        "architecture_args": metadata.architecture_args,
        "export": EXPORT_FORMAT,
        "opset": ONNX_OPSET,
    }
    text = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def cached_onnx_path(metadata: WeightsMetadata, cache_dir: Path) -> Path:
    """Where the ONNX export of the weights described by ``metadata`` is kept."""
    if not metadata.payload_sha256:
        raise WeightsError("weights metadata has no payload_sha256: cannot key an ONNX export")
    return cache_dir / f"{metadata.kind}-{cache_key(metadata)[:32]}.onnx"


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_onnx(module: nn.Module, metadata: WeightsMetadata, target: Path) -> Path:
    """Export ``module`` to ``target`` atomically, after checking ONNX Runtime's output.

    Raises
    ------
    WeightsError
        The exported graph does not reproduce PyTorch's output within the stated tolerance.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    example = export_example(metadata)
    axes: dict[str, dict[int, str]] = {"input": {0: "batch"}, "output": {0: "batch"}}
    if metadata.kind == "segmentation":
        axes["input"].update({2: "height", 3: "width"})
        axes["output"].update({2: "height", 3: "width"})
    module = module.eval().to("cpu")
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
            torch.onnx.export(
                module,
                (example,),
                str(partial),
                input_names=["input"],
                output_names=["output"],
                dynamic_axes=axes,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
            reference = module(example).numpy()
        exported = OrtNetwork(partial, threads=1)(example).numpy()
        if not np.allclose(exported, reference, rtol=EXPORT_RTOL, atol=EXPORT_ATOL):
            difference = float(np.max(np.abs(exported - reference)))
            raise WeightsError(
                f"the ONNX export of the {metadata.kind} weights differs from PyTorch by "
                f"{difference:.3g} (tolerance {EXPORT_ATOL} + {EXPORT_RTOL} x |value|); "
                "set model.runtime = 'torch'"
            )
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, target)
        _fsync_directory(target.parent)
    finally:
        partial.unlink(missing_ok=True)
    return target


def onnx_network(module: nn.Module, metadata: WeightsMetadata, cache_dir: Path) -> OrtNetwork:
    """An ONNX Runtime session for ``module``, from the cache or exported into it first.

    A cached file that ONNX Runtime cannot load (truncated by a full disk, say) is exported
    again once.
    """
    path = cached_onnx_path(metadata, cache_dir)
    if path.is_file():
        try:
            return OrtNetwork(path)
        except Exception as exc:  # onnxruntime raises its own exception types
            logger.warning("cached ONNX file %s does not load (%s); exporting again", path, exc)
    logger.info("exporting the %s network to ONNX: %s", metadata.kind, path)
    export_onnx(module, metadata, path)
    return OrtNetwork(path)


__all__ = [
    "EXPORT_FORMAT",
    "ONNX_CACHE_DIRNAME",
    "ONNX_OPSET",
    "RUNTIMES",
    "OrtNetwork",
    "Runtime",
    "cache_key",
    "cached_onnx_path",
    "export_onnx",
    "onnx_network",
    "onnxruntime_available",
    "resolve_runtime",
]
