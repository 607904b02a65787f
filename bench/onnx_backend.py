"""The method's two networks exported to ONNX and run by ONNX Runtime on the CPU.

:func:`onnx_analyser` returns an :class:`~dermpacs.inference.pipeline.Analyser` whose networks
are :class:`OrtNetwork` modules: the same metadata, crop rule and post-processing, only the two
forward passes run in ONNX Runtime (which folds batch normalisation into the convolutions and
fuses activations, where eager PyTorch on the CPU runs each layer on its own). The export uses
``torch.onnx.export`` with dynamic batch, height and width, so photos of any orientation and
any number of crops reuse one session.

This lives in bench/ because it is measured here first; the numbers in docs/benchmarks.md say
whether it belongs in the service.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ONNX_OPSET = 17


class OrtNetwork(nn.Module):
    """A forward pass in ONNX Runtime behind the ``nn.Module`` interface the Analyser calls."""

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # No spinning between runs: on a shared CPU, idle threads spinning for a while after
        # each forward pass take cores from the rest of the pipeline (and from other work).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        (output,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(output)


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, *, spatial: bool) -> Path:
    """Export ``module`` with a dynamic batch (and height and width when ``spatial``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    axes: dict[str, dict[int, str]] = {"input": {0: "batch"}, "output": {0: "batch"}}
    if spatial:
        axes["input"].update({2: "height", 3: "width"})
        axes["output"].update({2: "height", 3: "width"})
    module = module.eval().to("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and shape notes
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return path


def onnx_analyser(analyser: Any, folder: Path, *, export: bool = True) -> Any:
    """An Analyser with the same settings whose networks run in ONNX Runtime (CPU).

    ``export=False`` loads ``segmentation.onnx`` and ``classifier.onnx`` exported earlier
    into ``folder`` from the same networks.
    """
    from dermpacs.inference.pipeline import Analyser

    seg_meta = analyser.segmentation_metadata
    cls_meta = analyser.classifier_metadata
    long_side = seg_meta.input_size
    seg_path, cls_path = folder / "segmentation.onnx", folder / "classifier.onnx"
    if export:
        export_onnx(
            analyser.segmentation,
            torch.zeros(1, 3, long_side * 3 // 4 // 32 * 32, long_side),
            seg_path,
            spatial=True,
        )
        export_onnx(
            analyser.classifier,
            torch.zeros(2, 3, cls_meta.input_size, cls_meta.input_size),
            cls_path,
            spatial=False,
        )
    return Analyser(
        OrtNetwork(seg_path),
        seg_meta,
        OrtNetwork(cls_path),
        cls_meta,
        crop_settings=analyser.crop_settings,
        quality_settings=analyser.quality_settings,
        device="cpu",
    )
