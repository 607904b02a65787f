"""``dermpacs train segmentation|classifier``: train a network on an annotated photo set."""

from __future__ import annotations

import argparse
import json
import logging

from dermpacs.config import Settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=["segmentation", "classifier"], help="which network")
    parser.add_argument("--data", required=True, help="annotated set: images/, masks/, labels.csv")
    parser.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs (default 30)")
    parser.add_argument("--batch-size", type=int, default=16, help="photos or crops per step")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, order, augmentation")
    parser.add_argument(
        "--device", default="", help="auto, cpu, cuda, cuda:N (default: model.device)"
    )
    parser.add_argument(
        "--resume", default=None, help="resume checkpoint (<out>.resume.safetensors)"
    )
    parser.add_argument(
        "--input-size", type=int, default=128, help="classifier crop side in pixels (default 128)"
    )
    parser.add_argument(
        "--long-side",
        type=int,
        default=0,
        help="segmentation input long side (default: model.long_side)",
    )
    parser.add_argument("--validation-fraction", type=float, default=0.05, help="photos held out")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="seconds; fewer epochs if needed"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes that read the photos")
    parser.add_argument("--version", default="", help="version string stored in the weights")
    parser.add_argument(
        "--network",
        default="{}",
        help='network arguments as JSON, e.g. \'{"encoder_name": "efficientnet-b0"}\'',
    )
    parser.add_argument(
        "--init", default=None, help="segmentation: start from these weights (fine-tune)"
    )
    parser.add_argument(
        "--crop",
        type=int,
        default=0,
        help="segmentation: train on random square windows of this side (multiple of 32)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-mixed-precision", action="store_true", help="float32 on the GPU")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from dermpacs.training.dataset import DatasetError
    from dermpacs.training.train import (
        TrainingError,
        TrainingOptions,
        train_classifier,
        train_segmentation,
    )

    try:
        network = json.loads(args.network)
        if not isinstance(network, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        print(f"dermpacs train: --network must be a JSON object: {exc}")
        return 2
    options = TrainingOptions(
        task=args.task,
        data=args.data,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        device=args.device or settings.model.device,
        long_side=args.long_side or settings.model.long_side,
        input_size=args.input_size,
        classes=tuple(settings.model.classes) if args.task == "classifier" else (),
        validation_fraction=args.validation_fraction,
        time_limit=args.time_limit,
        resume=args.resume,
        loader_workers=args.workers,
        progress=not args.no_progress,
        mixed_precision=not args.no_mixed_precision,
        network=network,
        init=args.init,
        crop=args.crop,
    )
    if args.version:
        options.version = args.version
    try:
        if args.task == "segmentation":
            result = train_segmentation(options)
        else:
            result = train_classifier(options, settings.crops)
    except (TrainingError, DatasetError) as exc:
        print(f"dermpacs train: {exc}")
        return 2
    log.info(
        "wrote %s (%s) after %d epochs in %.0f s; last epoch %s",
        result.weights,
        result.metadata.model_version,
        result.epochs_run,
        result.seconds,
        result.history[-1] if result.history else {},
    )
    return 0
