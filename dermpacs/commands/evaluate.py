"""``dermpacs evaluate``: the method's figures on an annotated set (one JSON object with --json)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dermpacs.config import Settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="annotated set: images/, masks/, labels.csv")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument(
        "--segmentation-weights", default="", help="default: model.segmentation_weights"
    )
    parser.add_argument(
        "--classifier-weights", default="", help="default: model.classifier_weights"
    )
    parser.add_argument(
        "--device", default="", help="auto, cpu, cuda, cuda:N (default: model.device)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="photos analysed together")
    parser.add_argument("--limit", type=int, default=0, help="only the first N photos")
    parser.add_argument("--out", default="", help="also write the JSON report to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from dermpacs.inference.pipeline import Analyser, WeightsError
    from dermpacs.training.dataset import AnnotatedPhotoSet, DatasetError
    from dermpacs.training.evaluate import EvaluationError, evaluate, format_report

    model = settings.model.model_copy()
    if args.segmentation_weights:
        model.segmentation_weights = args.segmentation_weights
    if args.classifier_weights:
        model.classifier_weights = args.classifier_weights
    configured = settings.model_copy(update={"model": model})
    try:
        analyser = Analyser.from_settings(configured, device=args.device or None)
        dataset = AnnotatedPhotoSet(args.data, analyser.classes)
        report = evaluate(
            analyser,
            dataset,
            batch_size=args.batch_size,
            limit=args.limit or None,
            progress=not args.no_progress,
        )
    except (WeightsError, DatasetError, EvaluationError, ValueError) as exc:
        print(f"dermpacs evaluate: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=None if args.json else 2, sort_keys=False)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(report, indent=2) + "\n")
    print(text if args.json else format_report(report))
    return 0
