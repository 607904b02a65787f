"""``python -m bench``: run the suite, save the results, write the tables.

Each part (receive, inference, end to end) runs in its own process with a time limit; a part
that fails or runs out of time is recorded as such and the others still run. The combined
result is written as JSON (``--out-dir``; by default ``bench/results/<date>-full.json``, and
``var/bench/results/`` for short runs) and
its tables rendered into ``docs/benchmarks.md`` between the result markers (full runs only,
unless ``--docs`` names a file). A GPU result (``bench/results/gpu*.json``, made on a CUDA
machine by ``python -m bench.gpu_inference``) is included when present.

``--short`` runs each part on a handful of small photos: it checks that the harness works
and asserts no times (``make bench BENCH_SHORT=1``, and tests/test_bench_harness.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.cli import exit_on_sigterm
from bench.services import REPO

RESULTS_DIR = REPO / "bench" / "results"
SHORT_RESULTS_DIR = REPO / "var" / "bench" / "results"
DOCUMENT = REPO / "docs" / "benchmarks.md"
PARTS = ("receive", "inference", "end_to_end", "end_to_end_4mp", "end_to_end_1mp")
# The end-to-end part at other photo sizes (how cost grows): the same script, another --size.
E2E_SIZES = {"end_to_end": "12mp", "end_to_end_4mp": "4mp", "end_to_end_1mp": "1mp"}
# Seconds each part may run (full mode); the end-to-end parts hold their own backlog budget.
TIME_LIMITS = {
    "receive": 1200,
    "inference": 1500,
    "end_to_end": 3000,
    "end_to_end_4mp": 2000,
    "end_to_end_1mp": 1500,
}
SHORT_TIME_LIMITS = {
    "receive": 120,
    "inference": 180,
    "end_to_end": 180,
    "end_to_end_4mp": 180,
    "end_to_end_1mp": 180,
}


def run_part(
    part: str,
    *,
    short: bool,
    limit: float,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python -m bench.<part>`` with a time limit; its JSON result, or an error record."""
    with tempfile.NamedTemporaryFile(prefix=f"bench-{part}-", suffix=".json") as out:
        module = "end_to_end" if part in E2E_SIZES else part
        argv = [sys.executable, "-m", f"bench.{module}", "--out", out.name, *extra]
        if part in E2E_SIZES and not short:
            argv += ["--size", E2E_SIZES[part]]
        if short:
            argv.append("--short")
        started = time.time()
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        try:
            _, errors = process.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the part stops the services it started in its finally blocks.
            process.send_signal(signal.SIGTERM)
            try:
                _, errors = process.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                _, errors = process.communicate()
            return {"error": f"ran out of its {limit:.0f} s limit", "stderr": errors[-3000:]}
        if process.returncode != 0:
            return {
                "error": f"exited with {process.returncode} after {time.time() - started:.0f} s",
                "stderr": errors[-3000:],
            }
        return dict(json.loads(Path(out.name).read_text()))


def latest_gpu_result() -> dict[str, Any] | None:
    candidates = sorted(RESULTS_DIR.glob("gpu*.json"), key=lambda p: p.stat().st_mtime)
    return report.load(candidates[-1]) if candidates else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="harness check, small and fast")
    parser.add_argument("--only", default="", help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes")
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="Markdown file to write the tables into (default: docs/benchmarks.md on full runs)",
    )
    parser.add_argument("--no-docs", action="store_true", help="write no Markdown")
    parser.add_argument(
        "--e2e-backlog", type=int, default=None, help="photos in the end-to-end backlog"
    )
    parser.add_argument(
        "--e2e-budget", type=float, default=None, help="seconds allowed to drain the backlog"
    )
    parser.add_argument(
        "--e2e-model",
        choices=["auto", "shipped", "untrained"],
        default=None,
        help="networks for the end-to-end part only (default: as the other parts, "
        "DERMPACS_BENCH_MODEL or auto)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="an earlier results JSON whose parts are kept where this run does not redo them",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="measure nothing: write the tables of this results JSON into --docs "
        "(default docs/benchmarks.md)",
    )
    args = parser.parse_args(argv)
    if args.render:
        document = args.docs or DOCUMENT
        report.write_into(document, report.render(report.load(args.render)))
        print(f"bench: tables of {args.render} written into {document}")
        return 0
    # a short run checks the harness once per script: the end-to-end part at one size
    default_parts = [p for p in PARTS if not args.short or p not in E2E_SIZES or p == "end_to_end"]
    parts = [p for p in args.only.split(",") if p] or default_parts
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s): {', '.join(unknown)}")
    limits = SHORT_TIME_LIMITS if args.short else TIME_LIMITS
    exit_on_sigterm()
    started = time.time()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "short": args.short,
        "parts": {},
    }
    if args.merge:
        earlier = report.load(args.merge)
        results["parts"] = {
            name: part for name, part in earlier.get("parts", {}).items() if name not in parts
        }
        results["merged_from"] = {
            "file": str(args.merge),
            "date": earlier.get("date"),
            "command": earlier.get("command"),
            "parts": sorted(results["parts"]),
        }
    for part in parts:
        extra: list[str] = []
        env: dict[str, str] = {}
        if part in E2E_SIZES:
            if args.e2e_model:
                env["DERMPACS_BENCH_MODEL"] = args.e2e_model
            if args.e2e_backlog:
                extra += ["--backlog", str(args.e2e_backlog)]
            if args.e2e_budget:
                extra += ["--backlog-budget", str(args.e2e_budget)]
        print(f"bench: {part} ...", flush=True)
        part_started = time.time()
        results["parts"][part] = run_part(
            part, short=args.short, limit=limits[part], extra=extra, env=env
        )
        state = results["parts"][part].get("error", "done")
        print(f"bench: {part} {state} in {time.time() - part_started:.0f} s", flush=True)
    gpu = latest_gpu_result()
    if gpu:
        results["parts"]["gpu"] = gpu
    results["seconds"] = round(time.time() - started)
    # Full runs are kept with the code (bench/results/); harness checks go to var/.
    out_dir = args.out_dir or (SHORT_RESULTS_DIR if args.short else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = time.strftime("%Y%m%d-%H%M%S") + ("-short" if args.short else "-full") + ".json"
    json_path = out_dir / name
    json_path.write_text(json.dumps(results, indent=2))
    print(f"bench: results in {json_path}")
    document = args.docs or (None if args.short else DOCUMENT)
    if document and not args.no_docs:
        report.write_into(document, report.render(results))
        print(f"bench: tables written into {document}")
    failed = [p for p in parts if "error" in results["parts"][p]]  # this run's parts only
    if failed:
        print(f"bench: failed parts: {', '.join(failed)}", file=sys.stderr)
        for part in failed:
            print(f"--- {part}: {results['parts'][part]['error']}", file=sys.stderr)
            print(results["parts"][part].get("stderr", ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
