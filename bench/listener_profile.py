"""Where a dermpacs C-STORE's time goes: the intake service in this process, instrumented.

The listener runs here exactly as ``dermpacs listen`` runs it (same settings, Redis broker,
publisher and reconciler threads), with timers wrapped around each step of the C-STORE handler:
reading the received data set, admission, the job-store look-up, the spool write with its
fsyncs, the job row's commit, and the handler as a whole. dcmtk ``storescu`` sends the burst
from another process. Time per photo that is not in the handler is pynetdicom receiving the
PDUs (and the response going back), plus waiting for the GIL that the publisher thread holds.

Nothing is changed in dermpacs: the wrappers are installed on the objects of this process.

Run: ``python -m bench.listener_profile --kind native --size vga --photos 150``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import inputs
from bench.models import choose_model
from bench.services import LOOPBACK, MAX_PDU, NODELAY, dcmtk, flush_redis, free_port, redis_url


class StepTimes:
    """Thread-safe accumulation of durations per named step (milliseconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samples: dict[str, list[float]] = defaultdict(list)

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = (time.perf_counter() - started) * 1000.0
                with self._lock:
                    self.samples[name].append(elapsed)

        return timed

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "count": len(values),
                "mean_ms": round(statistics.fmean(values), 3),
                "median_ms": round(statistics.median(values), 3),
                "total_s": round(sum(values) / 1000.0, 3),
            }
            for name, values in self.samples.items()
        }


def profile_listener(
    kind: str, size: str, photos: int, associations: int = 1, *, max_pdu_size: int = 0
) -> dict[str, Any]:
    """Send ``photos`` to an instrumented in-process listener; the time of each step."""
    from dermpacs.commands.listen import quiet_libraries
    from dermpacs.config import Settings
    from dermpacs.intake import listener as listener_module
    from dermpacs.intake.service import IntakeService
    from dermpacs.processing import model_version
    from workers.app import configure, publish_dispatch, publish_processing, redelivery_grace

    quiet_libraries(False)
    root = Path(tempfile.mkdtemp(prefix="dermpacs-bench-listener-"))
    port = free_port()
    settings = Settings.model_validate(
        {
            "listener": {
                "ae_title": "DERMPACS",
                "host": LOOPBACK,
                "port": port,
                "max_pdu_size": max_pdu_size,
            },
            "broker": {"url": redis_url()},
            "storage": {"root": str(root / "var")},
            "model": choose_model().section,
        }
    )
    times = StepTimes()
    flush_redis()
    configure(settings)
    original_admit = listener_module.admit
    listener_module.admit = times.wrap("admit (header checks)", original_admit)  # type: ignore[assignment]
    try:
        service = IntakeService(
            settings,
            model_version=model_version(settings),
            publish_processing=times.wrap(
                "publish task to Redis (publisher thread)", publish_processing
            ),
            publish_dispatch=publish_dispatch,
            queued_grace=redelivery_grace(settings),
        )
        listener = service.listener
        store, spool = listener.store, listener.spool
        store.find = times.wrap("job store look-up (find)", store.find)  # type: ignore[method-assign]
        store.record_received = times.wrap(  # type: ignore[method-assign]
            "job row commit (record_received)", store.record_received
        )
        store.mark_queued = times.wrap(  # type: ignore[method-assign]
            "mark queued commit (publisher thread)", store.mark_queued
        )
        spool.spool_received_instance = times.wrap(  # type: ignore[method-assign]
            "spool write + fsync + rename + dir fsync", spool.spool_received_instance
        )
        handle = listener.handle_store

        def handle_store(event: Any) -> Any:
            started = time.perf_counter()
            event.encoded_dataset(include_meta=True)  # cached by pynetdicom for the handler
            with times._lock:
                times.samples["read received data set (encoded_dataset)"].append(
                    (time.perf_counter() - started) * 1000.0
                )
            return handle(event)

        listener.handle_store = times.wrap("whole C-STORE handler", handle_store)  # type: ignore[method-assign]
        service.start()
        template = inputs.input_file(kind, size)
        files = inputs.unique_copies(template, root / "send", photos)
        os.sync()
        groups = [files[i::associations] for i in range(associations)]
        argv = [dcmtk("storescu"), "-aec", "DERMPACS", "-aet", "CAMERA", "--max-pdu", str(MAX_PDU)]
        if kind == "camera":
            argv.append("-xy")
        cpu_before = os.times()
        started = time.perf_counter()
        senders = [
            subprocess.Popen(
                [*argv, LOOPBACK, str(port), *map(str, group)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, **NODELAY},
            )
            for group in groups
        ]
        codes = [s.wait(600) for s in senders]
        wall = time.perf_counter() - started
        cpu_after = os.times()
        time.sleep(0.5)  # the publisher finishes the burst
        service.stop()
    finally:
        listener_module.admit = original_admit  # type: ignore[assignment]
        flush_redis()
        shutil.rmtree(root, ignore_errors=True)
    process_cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    steps = times.summary()
    handler = steps.get("whole C-STORE handler", {}).get("total_s", 0.0)
    return {
        "kind": kind,
        "size": size,
        "photos": photos,
        "associations": associations,
        "listener_max_pdu_size": max_pdu_size,
        "storescu_exit_codes": codes,
        "wall_s": round(wall, 3),
        "photos_per_second": round(photos / wall, 2),
        "listener_process_cpu_s": round(process_cpu, 3),
        "ms_per_photo": round(wall * 1000 / photos, 2),
        "handler_share_of_wall": round(handler / wall, 3) if wall else None,
        "steps": steps,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["camera", "native"], default="native")
    parser.add_argument("--size", choices=sorted(inputs.SIZES), default="vga")
    parser.add_argument("--photos", type=int, default=100)
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--max-pdu", type=int, default=0, help="listener.max_pdu_size")
    args = parser.parse_args(argv)
    result = profile_listener(
        args.kind, args.size, args.photos, args.associations, max_pdu_size=args.max_pdu
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
