"""Training of the segmentation network and of the crop classifier.

Both trainings read an annotated set (:mod:`dermpacs.training.dataset`), hold it in memory as
8-bit tensors (on the GPU when there is one) and augment each batch there with MONAI transforms,
in groups of a few samples stacked along the channel axis, so that the CPU never becomes the
bottleneck:

* intensity: contrast (gamma), brightness scale and shift, per-channel gain (white balance),
  Gaussian smoothing (defocus) and sensor noise;
* geometry: flips, quarter turns, and an affine map (rotation, scale, translation).

Segmentation sees each photo as the pipeline does (:mod:`dermpacs.inference.preprocessing`):
resized so that its long side is ``long_side``, normalised, padded at the bottom and right with
the mean colour (zero after normalisation) and labelled background there. The loss is MONAI's
DiceCELoss over background, skin and lesion.

The classifier is trained on crops cut by the paper's rule from the true masks
(:func:`dermpacs.inference.crops.select_truth_crops`: more than 80 % skin and more than 10 %
lesion), with more and more overlapping windows than the pipeline keeps for variety, plus each
photo whole (the pipeline's fallback when no window qualifies). The loss is cross-entropy,
weighted so that every class counts the same.

Runs are deterministic for a given seed on the CPU: photos are shuffled, transforms and noise are
seeded from ``(seed, epoch)``, so a run resumed from its epoch checkpoint ends with the same
weights as an uninterrupted one. On CUDA some kernels (bilinear upsampling's backward) use atomic
additions, so two GPU runs agree closely but not bit for bit.

After every epoch two files are written: the weights (``--out``, safetensors with metadata, see
:mod:`dermpacs.inference.weights`) and a resume checkpoint next to it (``<out>.resume.safetensors``)
that also holds the optimizer state and the history; the shipped weights never carry optimizer
state.

Segmentation can start from earlier weights (``init``: fine-tuning, e.g. the shipped reference
weights on a set with negatives) and train on random square ``crop`` windows of the analysis-scale
photos: the scale the network sees stays the pipeline's, the cost per sample falls with the area
(what makes a fine-tune on a CPU affordable).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from torch import nn

from dermpacs import __version__
from dermpacs.analysis import BACKGROUND
from dermpacs.config import CropSettings
from dermpacs.training.dataset import AnnotatedPhoto, AnnotatedPhotoSet, load_pair, map_photos

log = logging.getLogger(__name__)

Task = Literal["segmentation", "classifier"]
RESUME_FORMAT = "dermpacs-resume/1"
# Samples stacked per MONAI transform call: each group gets its own random parameters.
SEGMENTATION_AUGMENT_GROUP = 4
CLASSIFIER_AUGMENT_GROUP = 32


class TrainingError(ValueError):
    """Training cannot start or go on with the arguments given."""


@dataclass
class TrainingOptions:
    """Everything a training run depends on; recorded in the weights' provenance.

    ``long_side`` is the segmentation input's long side; ``input_size`` the classifier's crop
    side. ``time_limit`` (seconds) shortens the run after its first epoch when the planned epochs
    would not fit, re-planning the learning-rate schedule (the first epoch is warm-up in every
    plan, so the result equals a run planned with the shorter length from the start).
    """

    task: Task
    data: str
    out: str
    epochs: int = 30
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    long_side: int = 512
    input_size: int = 128
    classes: tuple[str, ...] = ()
    validation_fraction: float = 0.05
    time_limit: float | None = None
    resume: str | None = None
    version: str = f"{__version__}-synthetic"
    loader_workers: int = 1
    progress: bool = True
    mixed_precision: bool = True
    network: dict[str, Any] = field(default_factory=dict)
    crops: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    crop: int = 0


@dataclass
class TrainingResult:
    """What a run produced."""

    weights: Path
    resume_checkpoint: Path
    epochs_run: int
    seconds: float
    history: list[dict[str, float]]
    metadata: Any


# --------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainingError(f"unknown device {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} asked for but no CUDA device is available")
    return device


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices; the validation share is at least one photo."""
    order = np.random.default_rng([seed, 99]).permutation(count)
    n_val = int(round(count * fraction)) if fraction > 0 else 0
    if fraction > 0 and count > 1:
        n_val = min(max(1, n_val), count - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


WARMUP_EPOCHS = 2


def learning_rate_at(step: int, steps_per_epoch: int, epochs: int, peak: float) -> float:
    """Linear warm-up over the first two epochs (one when the run has two), then cosine decay
    to zero at the last step."""
    warmup = max(1, steps_per_epoch * max(1, min(WARMUP_EPOCHS, epochs - 1)))
    total = max(warmup + 1, steps_per_epoch * epochs)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class RandChannelGaind(RandomizableTransform, MapTransform):
    """Multiply each channel by its own random gain (white balance).

    MONAI has no colour jitter for channel-first tensors; this is its minimal form, a dictionary
    transform seeded through ``set_random_state`` like MONAI's own randomizable transforms.
    """

    def __init__(self, keys: Sequence[str], prob: float = 0.5, spread: float = 0.08) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.spread = spread

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            gains = self.R.uniform(1 - self.spread, 1 + self.spread, image.shape[0])
            factor = torch.as_tensor(gains, dtype=image.dtype, device=image.device)
            d[key] = image * factor.view(-1, *([1] * (image.ndim - 1)))
        return d


def _intensity_transforms() -> Any:
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    return Compose(
        [
            RandAdjustContrastd(keys="image", prob=0.4, gamma=(0.75, 1.35)),
            RandScaleIntensityd(keys="image", prob=0.5, factors=0.25),
            RandShiftIntensityd(keys="image", prob=0.3, offsets=0.06),
            RandChannelGaind(keys=["image"], prob=0.5, spread=0.08),
            RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2)),
        ]
    )


def _geometric_transforms(
    device: torch.device, size: int, with_label: bool, rotate: float, scale: float
) -> Any:
    from monai.transforms import Compose, RandAffined, RandFlipd, RandRotate90d

    keys = ("image", "label") if with_label else ("image",)
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    return Compose(
        [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandRotate90d(keys=keys, prob=0.5, max_k=3),
            RandAffined(
                keys=keys,
                prob=0.8,
                rotate_range=(rotate,),
                scale_range=(scale, scale),
                translate_range=(0.08 * size, 0.08 * size),
                mode=modes,
                padding_mode="zeros",  # zero is the mean colour after normalisation
                device=device,
            ),
        ]
    )


class BatchAugmenter:
    """Seeded MONAI augmentation of batches already on the training device."""

    def __init__(
        self,
        device: torch.device,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        with_label: bool,
        rotate: float,
        scale: float,
        max_noise: float = 0.03,
        group: int = SEGMENTATION_AUGMENT_GROUP,
    ) -> None:
        from monai.data import set_track_meta

        set_track_meta(False)  # plain tensors: no metadata bookkeeping per call
        self.device = device
        self.intensity = _intensity_transforms()
        self.geometry = _geometric_transforms(device, size, with_label, rotate, scale)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.max_noise = max_noise
        self.group = max(1, group)
        self.generator = torch.Generator(device=device)

    def reseed(self, seed: int) -> None:
        self.intensity.set_random_state(seed=seed % 2**32)
        self.geometry.set_random_state(seed=(seed + 1) % 2**32)
        self.generator.manual_seed(seed)

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment uint8 ``(B, 3, H, W)`` images (and ``(B, 1, H, W)`` labels).

        ``valid`` marks the pixels that belong to the photo (not padding), ``(B, 1, H, W)``.
        Returns normalised float images and long labels.
        """
        x = images.float() / 255.0
        outputs_x, outputs_y = [], []
        for start in range(0, x.shape[0], self.group):
            part = x[start : start + self.group]
            g = part.shape[0]
            stacked = self.intensity({"image": part.reshape(g * 3, *part.shape[2:])})["image"]
            part = stacked.reshape(g, 3, *part.shape[2:])
            noise = torch.rand((g, 1, 1, 1), generator=self.generator, device=x.device)
            part = part + noise * self.max_noise * torch.randn(
                part.shape, generator=self.generator, device=x.device
            )
            part = (part.clamp(0.0, 1.0) - self.mean) / self.std
            if valid is not None:
                part = part * valid[start : start + g].float()  # padding stays the mean colour
            item: dict[str, torch.Tensor] = {"image": part.reshape(g * 3, *part.shape[2:])}
            if labels is not None:
                item["label"] = labels[start : start + g, 0].float()
            item = self.geometry(item)
            outputs_x.append(torch.as_tensor(item["image"]).reshape(g, 3, *part.shape[2:]))
            if labels is not None:
                outputs_y.append(torch.as_tensor(item["label"]).round().long().unsqueeze(1))
        images_out = torch.cat(outputs_x)
        labels_out = torch.cat(outputs_y) if labels is not None else None
        return images_out, labels_out


# --------------------------------------------------------------------------- checkpoints
def resume_path(weights: str | Path) -> Path:
    """The resume checkpoint that goes with a weights file."""
    weights = Path(weights)
    return weights.with_name(weights.name + ".resume.safetensors")


def save_resume_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    planned_epochs: int,
    history: list[dict[str, float]],
    options: TrainingOptions,
) -> None:
    """Model, optimizer state and history in one safetensors file (no pickle)."""
    from safetensors.torch import save_file

    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optimizer/{index}/{key}"] = tensor.detach().cpu().contiguous()
    metadata = {
        "format": RESUME_FORMAT,
        "task": options.task,
        "epoch": str(epoch),
        "planned_epochs": str(planned_epochs),
        "param_groups": json.dumps(state["param_groups"]),
        "history": json.dumps(history),
        "options": json.dumps(asdict(options), default=str),
    }
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)


def load_resume_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, task: Task
) -> tuple[int, int, list[dict[str, float]]]:
    """Restore model and optimizer; return (last finished epoch, planned epochs, history)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise TrainingError(f"{path}: cannot read the resume checkpoint: {exc}") from exc
    if metadata.get("format") != RESUME_FORMAT:
        raise TrainingError(f"{path}: not a dermpacs resume checkpoint")
    if metadata.get("task") != task:
        raise TrainingError(f"{path}: checkpoint of a {metadata.get('task')} run, not {task}")
    model_state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as exc:
        raise TrainingError(f"{path}: the checkpoint does not fit this network: {exc}") from exc
    states: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            states.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(
        {"state": states, "param_groups": json.loads(metadata["param_groups"])}
    )
    return int(metadata["epoch"]), int(metadata["planned_epochs"]), json.loads(metadata["history"])


# --------------------------------------------------------------------------- data in memory
@dataclass
class _SegmentationArrays:
    images: torch.Tensor  # (N, 3, P, P) uint8
    labels: torch.Tensor  # (N, 1, P, P) uint8
    valid: torch.Tensor  # (N, 1, P, P) uint8: 1 on the photo, 0 on padding


def _analysis_pair(
    job: tuple[AnnotatedPhoto, int, int, tuple[int, ...]],
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    from dermpacs.inference.preprocessing import (
        analysis_shape,
        resize_label_map,
        resize_photo,
    )

    photo, long_side, padded, pad_colour = job
    rgb, mask = load_pair(photo)
    small = resize_photo(rgb, long_side)
    labels = resize_label_map(mask, analysis_shape(mask.shape, long_side))
    image = np.empty((padded, padded, 3), np.uint8)
    image[:] = pad_colour
    image[: small.shape[0], : small.shape[1]] = small
    label = np.full((padded, padded), BACKGROUND, np.uint8)
    label[: labels.shape[0], : labels.shape[1]] = labels
    return image, label, (int(small.shape[0]), int(small.shape[1]))


def _load_segmentation_arrays(
    photos: Sequence[AnnotatedPhoto],
    long_side: int,
    mean: Sequence[float],
    workers: int,
    device: torch.device,
) -> _SegmentationArrays:
    from dermpacs.inference.preprocessing import padded_size

    padded = padded_size(long_side)
    pad_colour = tuple(int(round(m * 255)) for m in mean)
    n = len(photos)
    images = np.empty((n, padded, padded, 3), np.uint8)
    labels = np.empty((n, 1, padded, padded), np.uint8)
    valid = np.zeros((n, 1, padded, padded), np.uint8)
    jobs = [(p, long_side, padded, pad_colour) for p in photos]
    for i, (image, label, (rows, cols)) in enumerate(map_photos(_analysis_pair, jobs, workers)):
        images[i] = image
        labels[i, 0] = label
        valid[i, 0, :rows, :cols] = 1.0
    return _SegmentationArrays(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device),
        torch.from_numpy(labels).to(device),
        torch.from_numpy(valid).to(device),
    )


def truth_crop_samples(
    job: tuple[AnnotatedPhoto, int, int, dict[str, Any]],
) -> tuple[np.ndarray, int]:
    """Training crops of one photo: windows chosen by the rule on its true mask, and the photo
    whole. Returns ``(crops (k, S, S, 3) uint8, number of rule windows among them)``."""
    from dermpacs.inference.crops import cut_crops, cut_whole_photo, select_truth_crops

    photo, long_side, size, crop_args = job
    rgb, mask = load_pair(photo)
    windows = select_truth_crops(mask, long_side=long_side, **crop_args)
    crops = cut_crops(rgb, [w.box for w in windows], size)
    whole = cut_whole_photo(rgb, size)
    return np.concatenate([crops, whole]), len(windows)


def _training_crop_arguments(settings: CropSettings, overrides: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's rule, with more windows overlapping more: variety for training."""
    args = {
        "min_skin_fraction": settings.min_skin_fraction,
        "min_lesion_fraction": settings.min_lesion_fraction,
        "window_fractions": tuple(settings.window_fractions),
        "stride_fraction": settings.stride_fraction,
        "max_crops": max(16, settings.max_crops),
        "max_overlap": max(0.5, settings.max_overlap),
    }
    args.update(overrides)
    return args


# --------------------------------------------------------------------------- the loop
def _open_set(options: TrainingOptions) -> AnnotatedPhotoSet:
    dataset = AnnotatedPhotoSet(options.data, options.classes or None)
    if len(dataset) < 2:
        raise TrainingError(f"{options.data}: at least two photos are needed to train")
    return dataset


def _progress(total: int, description: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="batch", disable=not enabled, leave=False)


def _fit(
    options: TrainingOptions,
    model: nn.Module,
    device: torch.device,
    n_train: int,
    train_step: Callable[[torch.Tensor, int], torch.Tensor],
    validate: Callable[[], dict[str, float]],
    reseed: Callable[[int], None],
    *,
    metadata: Callable[[int, list[dict[str, float]]], Any],
    run_started: float,
) -> TrainingResult:
    """Epochs of shuffled batches with warm-up and cosine decay, validated, then the weights
    (with ``metadata(epoch, history)``) written to ``options.out`` and the resume checkpoint
    next to them, after every epoch. ``run_started``: when the run began (perf_counter)."""
    from dermpacs.inference.weights import read_metadata, save_weights

    weights_path = Path(options.out)
    checkpoint = resume_path(weights_path)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay
    )
    steps_per_epoch = max(1, n_train // options.batch_size)
    planned = options.epochs
    history: list[dict[str, float]] = []
    start_epoch = 0
    if options.resume:
        start_epoch, planned, history = load_resume_state(
            options.resume, model, optimizer, options.task
        )
        planned = max(planned, options.epochs)
        log.info("resumed from %s after epoch %d of %d", options.resume, start_epoch, planned)
    started = time.perf_counter()
    epoch = start_epoch
    while epoch < planned:
        epoch_started = time.perf_counter()
        torch.manual_seed(_epoch_seed(options.seed, epoch, 0))
        reseed(_epoch_seed(options.seed, epoch, 1))
        order_generator = torch.Generator().manual_seed(_epoch_seed(options.seed, epoch, 2))
        order = torch.randperm(n_train, generator=order_generator)
        model.train()
        losses = []
        bar = _progress(steps_per_epoch, f"{options.task} {epoch + 1}/{planned}", options.progress)
        for step in range(steps_per_epoch):
            lr = learning_rate_at(
                epoch * steps_per_epoch + step, steps_per_epoch, planned, options.learning_rate
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = order[step * options.batch_size : (step + 1) * options.batch_size]
            loss = train_step(batch.to(device), step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}")
        bar.close()
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": lr}
        record.update(validate())
        record["seconds"] = round(time.perf_counter() - epoch_started, 2)
        history.append(record)
        log.info("%s epoch %d/%d: %s", options.task, epoch + 1, planned, record)
        epoch += 1
        # Re-plan after the second epoch: the first one carries the GPU's warm-up (kernel
        # selection, allocator), and both are warm-up epochs of every plan of 3 or more epochs,
        # so a shortened run equals one planned with its length from the start.
        if options.time_limit and epoch == start_epoch + 2 and epoch < planned:
            per_epoch = time.perf_counter() - epoch_started
            remaining = options.time_limit - (time.perf_counter() - started)
            fits = int(remaining // (per_epoch * 1.03)) + epoch
            if fits < planned:
                log.warning(
                    "time limit %.0f s: %d epochs fit (%.1f s each), not %d; schedule re-planned",
                    options.time_limit,
                    max(fits, epoch),
                    per_epoch,
                    planned,
                )
                planned = max(fits, epoch)
        save_weights(model, weights_path, metadata(epoch, history))
        save_resume_state(
            checkpoint,
            model,
            optimizer,
            epoch=epoch,
            planned_epochs=planned,
            history=history,
            options=options,
        )
    seconds = time.perf_counter() - run_started
    return TrainingResult(
        weights_path, checkpoint, epoch, seconds, history, read_metadata(weights_path)
    )


def _metadata(
    options: TrainingOptions,
    kind: str,
    classes: Sequence[str],
    input_size: int,
    epochs: int,
    history: list[dict[str, float]],
    seconds: float,
    dataset: AnnotatedPhotoSet,
    n_train: int,
    device: torch.device,
    extra: dict[str, Any] | None = None,
) -> Any:
    from dermpacs.inference.weights import DEFAULT_MEAN, DEFAULT_STD, WeightsMetadata

    provenance = {
        "data": str(options.data),
        "photos": len(dataset),
        "training_photos": n_train,
        "seed": options.seed,
        "epochs": epochs,
        "batch_size": options.batch_size,
        "learning_rate": options.learning_rate,
        "device": str(device),
        "training_seconds": round(seconds, 1),
        "dermpacs": __version__,
        "torch": torch.__version__,
        "last_epoch": history[-1] if history else {},
        **(extra or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return WeightsMetadata(
        kind=kind,  # type: ignore[arg-type]
        classes=tuple(classes),
        input_size=input_size,
        version=options.version,
        mean=DEFAULT_MEAN,
        std=DEFAULT_STD,
        provenance=provenance,
    )


def _prepare_device(device: torch.device) -> None:
    if device.type == "cuda":
        # fastest kernels for the fixed input size; GPU runs are close, not bitwise, repeatable
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _autocast(device: torch.device, enabled: bool) -> Any:
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def train_segmentation(options: TrainingOptions) -> TrainingResult:
    """Train DeepLabv3+ for background, skin and lesion and write its weights.

    Raises
    ------
    TrainingError, DatasetError
        Unusable options or data set.
    """
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric

    from dermpacs.inference.weights import (
        DEFAULT_MEAN,
        DEFAULT_STD,
        SEGMENTATION_CLASSES,
    )

    if options.long_side % 32:
        raise TrainingError(f"long_side must be a multiple of 32, got {options.long_side}")
    if options.crop and (options.crop % 32 or not 64 <= options.crop <= options.long_side):
        raise TrainingError(
            f"crop must be a multiple of 32 between 64 and long_side, got {options.crop}"
        )
    device = resolve_device(options.device)
    _prepare_device(device)
    dataset = _open_set(options)
    train_idx, val_idx = _split(len(dataset), options.validation_fraction, options.seed)
    started = time.perf_counter()
    arrays = _load_segmentation_arrays(
        list(dataset), options.long_side, DEFAULT_MEAN, options.loader_workers, device
    )
    log.info(
        "segmentation: %d photos in memory (%d training, %d validation) in %.1f s on %s",
        len(dataset),
        len(train_idx),
        len(val_idx),
        time.perf_counter() - started,
        device,
    )
    torch.manual_seed(options.seed)
    model, init_version = _segmentation_model(options, SEGMENTATION_CLASSES, device)
    extra: dict[str, Any] = {}
    if init_version:
        extra["init"] = init_version  # fine-tuned from these weights
    if options.crop:
        extra["crop"] = options.crop
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # A window, or a negative photo, often holds no lesion (or no skin): a per-sample Dice of an
    # absent class is 1 for any false positive and swamps the loss, so with windows the Dice is
    # taken over the whole batch.
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, batch=bool(options.crop))
    crop = options.crop or arrays.images.shape[-1]
    augment = BatchAugmenter(
        device,
        crop,
        DEFAULT_MEAN,
        DEFAULT_STD,
        with_label=True,
        rotate=math.pi / 6,
        scale=0.25,
    )
    train_ids = torch.as_tensor(train_idx, device=device)
    val_ids = torch.as_tensor(val_idx, device=device)
    mean = torch.tensor(DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(DEFAULT_STD, device=device).view(1, 3, 1, 1)

    # A fine-tune keeps the batch-norm statistics of the weights it starts from: small batches of
    # windows, many without skin, would pull them away from whole photos (scale and shift train).
    frozen_norms = (
        [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if init_version
        else []
    )

    def train_step(batch: torch.Tensor, step: int) -> torch.Tensor:
        for norm in frozen_norms:
            norm.eval()
        ids = train_ids[batch]
        images, labels, valid = arrays.images[ids], arrays.labels[ids], arrays.valid[ids]
        if crop < images.shape[-1]:
            # one random window per photo, drawn from the epoch-seeded global generator
            corners = torch.randint(0, images.shape[-1] - crop + 1, (len(ids), 2))
            images, labels, valid = (
                torch.stack(
                    [t[i, :, r : r + crop, c : c + crop] for i, (r, c) in enumerate(corners)]
                )
                for t in (images, labels, valid)
            )
        x, y = augment(images, labels, valid)
        assert y is not None
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, options.mixed_precision):
            logits = model(x)
        return loss_function(logits.float(), y)

    def validate() -> dict[str, float]:
        if len(val_ids) == 0:
            return {}
        metric = DiceMetric(include_background=True, reduction="mean_batch")
        model.eval()
        with torch.no_grad():
            for start in range(0, len(val_ids), options.batch_size):
                ids = val_ids[start : start + options.batch_size]
                x = (arrays.images[ids].float() / 255.0 - mean) / std * arrays.valid[ids].float()
                with _autocast(device, options.mixed_precision):
                    prediction = model(x).argmax(1, keepdim=True)
                truth = arrays.labels[ids].long()
                skin_p, skin_t = prediction > 0, truth > 0
                lesion_p, lesion_t = prediction == 2, truth == 2
                metric(
                    torch.cat([skin_p, lesion_p], 1).float(),
                    torch.cat([skin_t, lesion_t], 1).float(),
                )
        skin, lesion = (float(v) for v in metric.aggregate())
        return {"val_skin_dice": round(skin, 4), "val_lesion_dice": round(lesion, 4)}

    def metadata(epoch: int, history: list[dict[str, float]]) -> Any:
        return _metadata(
            options,
            "segmentation",
            SEGMENTATION_CLASSES,
            options.long_side,
            epoch,
            history,
            time.perf_counter() - started,
            dataset,
            len(train_idx),
            device,
            extra,
        )

    return _fit(
        options,
        model,
        device,
        len(train_idx),
        train_step,
        validate,
        augment.reseed,
        metadata=metadata,
        run_started=started,
    )


def _segmentation_model(
    options: TrainingOptions, classes: Sequence[str], device: torch.device
) -> tuple[nn.Module, str]:
    """A new DeepLabv3+ (``options.network``), or the network of ``options.init`` to fine-tune,
    with the version of the weights it starts from ("" for a new one).

    Raises
    ------
    TrainingError
        ``init`` is not segmentation weights for ``classes`` at ``long_side``, or ``network``
        asks for another architecture than the one ``init`` holds.
    """
    from dermpacs.inference.networks import DeepLabV3Plus
    from dermpacs.inference.weights import WeightsError, load_weights

    if not options.init:
        return DeepLabV3Plus(out_channels=len(classes), **options.network).to(device), ""
    expected = {"kind": "segmentation", "classes": list(classes), "input_size": options.long_side}
    try:
        model, metadata = load_weights(options.init, expected=expected, device=device)
    except WeightsError as exc:
        raise TrainingError(f"--init: {exc}") from exc
    differing = {
        key: value
        for key, value in options.network.items()
        if metadata.architecture_args.get(key) != value
    }
    if differing:
        raise TrainingError(
            f"--init {options.init} holds {metadata.architecture_args}; --network asks {differing}"
        )
    log.info("fine-tuning %s (%s)", options.init, metadata.model_version)
    return model.to(device), metadata.model_version


def train_classifier(options: TrainingOptions, crop_settings: CropSettings) -> TrainingResult:
    """Train the crop classifier on crops cut by the rule from the true masks.

    Raises
    ------
    TrainingError, DatasetError
        Unusable options or data set (also when the classes of the set are not the configured
        ones).
    """
    from dermpacs.inference.networks import build_classifier
    from dermpacs.inference.preprocessing import to_crop_batch
    from dermpacs.inference.weights import DEFAULT_MEAN, DEFAULT_STD

    device = resolve_device(options.device)
    _prepare_device(device)
    dataset = _open_set(options)
    classes = dataset.classes
    train_idx, val_idx = _split(len(dataset), options.validation_fraction, options.seed)
    started = time.perf_counter()
    crop_args = _training_crop_arguments(crop_settings, options.crops)
    jobs = [(p, options.long_side, options.input_size, crop_args) for p in dataset]
    crops_per_photo: list[np.ndarray] = []
    windows = 0
    for crops, n_windows in map_photos(truth_crop_samples, jobs, options.loader_workers):
        crops_per_photo.append(crops)
        windows += n_windows
    photo_labels = np.array([dataset.label_index(p) for p in dataset])

    def gather(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        crops = [crops_per_photo[i] for i in indices]
        owners = np.concatenate([np.full(len(c), i) for i, c in zip(indices, crops, strict=True)])
        return np.concatenate(crops), photo_labels[owners], owners

    train_x, train_y, _ = gather(train_idx)
    log.info(
        "classifier: %d training samples from %d photos (%d rule windows in all photos, and "
        "each photo whole) in %.1f s",
        len(train_x),
        len(train_idx),
        windows,
        time.perf_counter() - started,
    )
    images = torch.from_numpy(train_x).permute(0, 3, 1, 2).contiguous().to(device)
    targets = torch.from_numpy(train_y).long().to(device)
    counts = np.bincount(train_y, minlength=len(classes)).astype(np.float64)
    if (counts == 0).any():
        missing = [c for c, n in zip(classes, counts, strict=True) if n == 0]
        raise TrainingError(f"no training crops of {missing}: the set is too small")
    class_weights = torch.tensor(counts.sum() / (len(classes) * counts), dtype=torch.float32)
    loss_function = nn.CrossEntropyLoss(weight=class_weights.to(device))

    torch.manual_seed(options.seed)
    network_args = {"backbone": "resnet", **options.network}
    model = build_classifier(len(classes), **network_args).to(device)
    augment = BatchAugmenter(
        device,
        options.input_size,
        DEFAULT_MEAN,
        DEFAULT_STD,
        with_label=False,
        rotate=math.pi,
        scale=0.15,
        max_noise=0.02,
        group=CLASSIFIER_AUGMENT_GROUP,
    )

    def train_step(batch: torch.Tensor, step: int) -> torch.Tensor:
        x, _ = augment(images[batch])
        with _autocast(device, options.mixed_precision):
            logits = model(x)
        return loss_function(logits.float(), targets[batch])

    val_x, val_y, val_owner = gather(val_idx) if len(val_idx) else (None, None, None)

    def validate() -> dict[str, float]:
        if val_x is None:
            return {}
        model.eval()
        probabilities = []
        with torch.no_grad():
            for start in range(0, len(val_x), 256):
                batch = to_crop_batch(val_x[start : start + 256], DEFAULT_MEAN, DEFAULT_STD)
                with _autocast(device, options.mixed_precision):
                    logits = model(batch.to(device))
                probabilities.append(torch.softmax(logits.float(), 1).cpu().numpy())
        p = np.concatenate(probabilities)
        assert val_y is not None and val_owner is not None
        crop_accuracy = float((p.argmax(1) == val_y).mean())
        photo_correct = [
            p[val_owner == i].mean(0).argmax() == photo_labels[i] for i in np.unique(val_owner)
        ]
        return {
            "val_crop_accuracy": round(crop_accuracy, 4),
            "val_photo_accuracy": round(float(np.mean(photo_correct)), 4),
        }

    def metadata(epoch: int, history: list[dict[str, float]]) -> Any:
        return _metadata(
            options,
            "classifier",
            classes,
            options.input_size,
            epoch,
            history,
            time.perf_counter() - started,
            dataset,
            len(train_idx),
            device,
        )

    return _fit(
        options,
        model,
        device,
        len(train_x),
        train_step,
        validate,
        augment.reseed,
        metadata=metadata,
        run_started=started,
    )
