"""``dermpacs synth``: generate a synthetic annotated photo set (images/, masks/, labels.csv)."""

from __future__ import annotations

import argparse
import logging
import time

from dermpacs.config import Settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write images/, masks/, labels.csv")
    parser.add_argument("--count", type=int, required=True, help="number of photos")
    parser.add_argument("--seed", type=int, required=True, help="set seed (photo i uses seed, i)")
    parser.add_argument("--size", type=int, default=512, help="long side in pixels (default 512)")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes (0: one per CPU core; default 1)"
    )
    parser.add_argument(
        "--classes",
        default="",
        help="comma-separated subset of the configured classes (default: model.classes)",
    )
    parser.add_argument(
        "--negatives",
        type=float,
        default=0.0,
        help="share of photos without skin (label 'none'; for segmentation training only)",
    )
    parser.add_argument(
        "--realistic",
        action="store_true",
        help="people as in ordinary photos: heads and shoulders, hands, outdoor scenes and a "
        "camera model (docs/training.md); off, the photos of earlier versions",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from dermpacs.training.synth import SynthError, default_workers, iter_write_synthetic_set

    classes = [c for c in args.classes.split(",") if c] or list(settings.model.classes)
    workers = default_workers() if args.workers == 0 else args.workers
    started = time.perf_counter()
    try:
        rows = iter_write_synthetic_set(
            args.out,
            args.count,
            args.seed,
            args.size,
            classes,
            workers,
            args.negatives,
            args.realistic,
        )
        for _ in tqdm(rows, total=args.count, unit="photo", disable=args.no_progress):
            pass
    except SynthError as exc:
        print(f"dermpacs synth: {exc}")
        return 2
    elapsed = time.perf_counter() - started
    log.info(
        "wrote %d photos (seed %d, long side %d) to %s in %.1f s",
        args.count,
        args.seed,
        args.size,
        args.out,
        elapsed,
    )
    return 0
