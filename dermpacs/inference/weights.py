"""Model weights files: safetensors tensors plus the metadata that says what they are.

A weights file is a plain safetensors file (no pickle). Its header metadata (string to string)
holds, each value JSON-encoded:

``format``            ``"dermpacs-weights/1"``
``kind``              ``"segmentation"`` or ``"classifier"``
``architecture``      name understood by :func:`dermpacs.inference.networks.build_network`
``architecture_args`` constructor arguments that rebuild the network
``classes``           output classes in logit order
``input_size``        long side of the segmentation input, or side of the square classifier crop
``mean``, ``std``     per-channel normalisation of RGB values scaled to [0, 1]
``version``           the model's version string
``provenance``        how the weights were made: seed, data, date, command ...
``payload_sha256``    SHA-256 of the tensors (see :func:`payload_sha256`)

:func:`load_weights` rebuilds the network, checks the digest and refuses weights whose metadata
does not match what the configuration expects, with a :class:`WeightsError` that names the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dermpacs.inference.networks import (
    ArchitectureSpec,
    NetworkError,
    architecture_of,
    build_network,
)
from dermpacs.inference.versioning import weights_version

FORMAT = "dermpacs-weights/1"
SEGMENTATION_CLASSES = ("background", "skin", "lesion")  # label values 0, 1, 2
# Normalisation used unless a training run records another one (ImageNet statistics: a common
# neutral choice for photographs; the networks are not pretrained so nothing depends on it).
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)

WeightsKind = Literal["segmentation", "classifier"]


class WeightsError(ValueError):
    """A weights file cannot be used: unreadable, corrupted, or not what the configuration asks."""


@dataclass(frozen=True)
class WeightsMetadata:
    """What a weights file says about itself.

    ``architecture`` and ``architecture_args`` are filled from the model by :func:`save_weights`
    when left empty; ``payload_sha256`` is always computed there.
    """

    kind: WeightsKind
    classes: tuple[str, ...]
    input_size: int
    version: str
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    provenance: dict[str, Any] = field(default_factory=dict)
    architecture: str = ""
    architecture_args: dict[str, Any] = field(default_factory=dict)
    payload_sha256: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("segmentation", "classifier"):
            raise WeightsError(f"kind must be 'segmentation' or 'classifier', got {self.kind!r}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise WeightsError(f"classes must be at least two distinct names: {self.classes!r}")
        if self.input_size < 16:
            raise WeightsError(f"input_size must be at least 16, got {self.input_size}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise WeightsError("mean and std must have one value per channel, std positive")
        if not self.version:
            raise WeightsError("version must not be empty")
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def model_version(self) -> str:
        """``version+digest``: changes whenever the tensors change, even under the same version."""
        return weights_version(self.version, self.payload_sha256)

    def to_header(self) -> dict[str, str]:
        """The safetensors header metadata (every value JSON-encoded)."""
        header = {key: json.dumps(value, sort_keys=True) for key, value in asdict(self).items()}
        header["format"] = json.dumps(FORMAT)
        return header

    @classmethod
    def from_header(cls, header: Mapping[str, str] | None) -> WeightsMetadata:
        """Parse header metadata written by :meth:`to_header`.

        Raises
        ------
        WeightsError
            Not a dermpacs weights header, or a field missing or ill-typed.
        """
        if not header:
            raise WeightsError("no dermpacs metadata in the safetensors header")
        try:
            values = {key: json.loads(raw) for key, raw in header.items()}
        except json.JSONDecodeError as exc:
            raise WeightsError(f"metadata value is not JSON: {exc}") from exc
        if values.pop("format", None) != FORMAT:
            raise WeightsError(f"not a {FORMAT} file (format key missing or different)")
        names = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - names
        if unknown:
            raise WeightsError(f"unknown metadata keys: {sorted(unknown)}")
        try:
            return cls(
                kind=values["kind"],
                classes=tuple(values["classes"]),
                input_size=int(values["input_size"]),
                version=str(values["version"]),
                mean=tuple(values["mean"]),
                std=tuple(values["std"]),
                provenance=dict(values.get("provenance") or {}),
                architecture=str(values["architecture"]),
                architecture_args=dict(values["architecture_args"]),
                payload_sha256=str(values["payload_sha256"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, WeightsError):
                raise
            raise WeightsError(f"metadata field missing or ill-typed: {exc}") from exc


def payload_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors, independent of the file layout.

    For each tensor in name order: the name, its dtype and shape, then its bytes in C order
    (little-endian, as safetensors stores them).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}


def save_weights(model: nn.Module, path: str | Path, metadata: WeightsMetadata) -> WeightsMetadata:
    """Write ``model``'s tensors and ``metadata`` to a safetensors file.

    The architecture and its arguments come from the model; the digest is computed here.
    The file is written next to its destination and renamed into place.

    Returns
    -------
    WeightsMetadata
        The metadata as written (architecture and digest filled in).

    Raises
    ------
    WeightsError
        The model was not built by :mod:`dermpacs.inference.networks`, or its output size does
        not match the number of classes.
    """
    try:
        spec = architecture_of(model)
    except NetworkError as exc:
        raise WeightsError(str(exc)) from exc
    outputs = spec.args.get("out_channels", spec.args.get("num_classes"))
    if outputs != len(metadata.classes):
        raise WeightsError(
            f"the network has {outputs} outputs but metadata lists {len(metadata.classes)} classes"
        )
    tensors = _state_tensors(model)
    written = WeightsMetadata(
        **{
            **asdict(metadata),
            "architecture": spec.name,
            "architecture_args": spec.args,
            "payload_sha256": payload_sha256(tensors),
        }
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial_path), metadata=written.to_header())
    partial_path.replace(path)
    return written


def read_metadata(path: str | Path) -> WeightsMetadata:
    """Read only the metadata of a weights file (no tensors loaded).

    Raises
    ------
    WeightsError
        Missing or unreadable file, or no dermpacs metadata.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
    except (OSError, SafetensorError) as exc:
        raise WeightsError(f"{path}: cannot read weights: {exc}") from exc
    return WeightsMetadata.from_header(header)


def check_expected(
    metadata: WeightsMetadata, expected: Mapping[str, Any], path: str | Path
) -> None:
    """Refuse metadata that differs from ``expected`` on any key it names.

    Raises
    ------
    WeightsError
        Naming the first key that differs, with both values.
    """
    for key, wanted in expected.items():
        if key not in WeightsMetadata.__dataclass_fields__:
            raise WeightsError(f"cannot check unknown metadata key {key!r}")
        actual = getattr(metadata, key)
        if isinstance(actual, tuple):
            wanted = tuple(wanted)
        if actual != wanted:
            raise WeightsError(
                f"{path}: weights have {key}={actual!r} but the configuration expects {wanted!r}"
            )


def load_weights(
    path: str | Path,
    *,
    expected: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, WeightsMetadata]:
    """Rebuild a network from a weights file, verify it, and return it in eval mode.

    Parameters
    ----------
    path
        The safetensors file.
    expected
        Metadata values the caller requires, e.g. ``{"kind": "classifier", "classes": [...],
        "input_size": 512}``; any difference refuses the file.
    device
        Where to put the model.

    Raises
    ------
    WeightsError
        Unreadable file, not a dermpacs weights file, digest mismatch (corrupted or altered
        tensors), metadata that differs from ``expected``, or tensors that do not fit the
        architecture.
    """
    metadata = read_metadata(path)
    check_expected(metadata, expected or {}, path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise WeightsError(f"{path}: cannot read tensors: {exc}") from exc
    digest = payload_sha256(tensors)
    if digest != metadata.payload_sha256:
        raise WeightsError(
            f"{path}: tensors do not match their recorded sha256 "
            f"({digest[:12]} != {metadata.payload_sha256[:12]}): corrupted or altered"
        )
    try:
        model = build_network(ArchitectureSpec(metadata.architecture, metadata.architecture_args))
    except NetworkError as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    outputs = metadata.architecture_args.get(
        "out_channels", metadata.architecture_args.get("num_classes")
    )
    if outputs != len(metadata.classes):
        raise WeightsError(
            f"{path}: network has {outputs} outputs but metadata lists {len(metadata.classes)}"
        )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: tensors do not fit {metadata.architecture}: {exc}") from exc
    model.eval()
    return model.to(device), metadata
