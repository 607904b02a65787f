"""Where a dermpacs C-STORE's time goes: the intake service in this process, instrumented.

The listener runs here exactly as ``dermpacs listen`` runs it (same settings, Redis broker,
publisher and reconciler threads), with timers wrapped around each step of the C-STORE handler:
opening the spool file as the data set starts to arrive, admission, the spool commit with its
fsyncs, the job row's commit, and the handler as a whole. dcmtk ``storescu`` sends the burst
from another process. Time per photo that is not in the handler is pynetdicom receiving the
PDUs (and the response going back), plus waiting for the GIL that the publisher thread holds.

Nothing is changed in dermpacs: the wrappers are installed on the objects of this process.

``--variants`` also runs what-if experiments (a step removed, to measure its cost) and the bare
pynetdicom floor (a handler that only writes the bytes), taking turns so that machine noise
hits all alike.

Run: ``python -m bench.listener_profile --kind native --size vga --photos 150``, or
``--variants as-is,synchronous-row,bare-pynetdicom-fsync,bare-bulk-fsync --repeats 3``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import inputs
from bench.cli import exit_on_sigterm, write_result
from bench.models import choose_model
from bench.services import (
    LOOPBACK,
    NODELAY,
    flush_redis,
    free_port,
    redis_url,
    storescu_argv,
)


def send_with_storescu(
    port: int, called_aet: str, kind: str, files: Sequence[Path], associations: int
) -> tuple[list[int], float, float]:
    """Send ``files`` from ``associations`` dcmtk ``storescu`` processes started together.

    Returns their exit codes, the wall-clock seconds until the last one exited, and the CPU
    seconds this process (the listener under test) spent meanwhile.
    """
    argvs = [
        storescu_argv(
            port,
            files[i::associations],
            called_aet=called_aet,
            options=inputs.storescu_syntax_options(kind),
        )
        for i in range(associations)
    ]
    cpu_before = os.times()
    started = time.perf_counter()
    senders = [
        subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **NODELAY},
        )
        for argv in argvs
    ]
    codes = [s.wait(600) for s in senders]
    wall = time.perf_counter() - started
    cpu_after = os.times()
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    return codes, wall, cpu


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


VARIANTS = {
    "as-is": "the listener as it is (as `dermpacs listen` runs it: publisher in a child process)",
    "publisher-thread": "what-if: the publisher as a thread of the listener's process (as before "
    "the publisher process); times its publish and 'queued' commit",
    "no-mark-queued": "what-if: publisher thread that does not commit 'queued' (upper bound of "
    "making that commit cheaper)",
    "synchronous-row": "what-if: the job row committed synchronously (SQLite synchronous=FULL), "
    "as before the spool became the write-ahead log",
    "polling-reactor": "what-if: each association's reactor polls its message queue every "
    "millisecond, as pynetdicom's does (before the listener's ReactorQueue)",
}


def profile_listener(
    kind: str,
    size: str,
    photos: int,
    associations: int = 1,
    *,
    max_pdu_size: int = 0,
    variant: str = "as-is",
) -> dict[str, Any]:
    """Send ``photos`` to an instrumented in-process listener; the time of each step.

    ``variant`` other than ``as-is`` removes one step, to measure what it costs: these are
    experiments for the listener's owner, not configurations of the service.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    from dermpacs.commands.listen import quiet_libraries
    from dermpacs.config import Settings
    from dermpacs.intake import listener as listener_module
    from dermpacs.intake.service import IntakeService
    from dermpacs.intake.spool import IncomingFile
    from dermpacs.jobs.publisher import PublisherProcess
    from dermpacs.processing import model_version
    from workers.app import (
        configure,
        processing_publisher,
        publish_dispatch,
        publish_processing,
        redelivery_grace,
    )

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
    original_wait_for_messages = listener_module.wait_for_messages
    if variant == "polling-reactor":
        listener_module.wait_for_messages = lambda assoc: None  # type: ignore[assignment,return-value]
    original_commit = IncomingFile.commit
    listener_module.admit = times.wrap("admit (header checks)", original_admit)  # type: ignore[assignment]
    try:
        threaded = variant in ("publisher-thread", "no-mark-queued")
        service = IntakeService(
            settings,
            model_version=model_version(settings),
            publish_processing=times.wrap(
                "publish task to Redis (publisher thread)", publish_processing
            ),
            publish_dispatch=publish_dispatch,
            queued_grace=redelivery_grace(settings),
            publisher=None if threaded else PublisherProcess(settings, processing_publisher),
        )
        listener = service.listener
        store = listener.store
        record_received = store.record_received
        if variant == "synchronous-row":

            def record_received(*args: Any, **kwargs: Any) -> Any:
                return store.__class__.record_received(
                    store, *args, **{**kwargs, "synchronous_commit": True}
                )

        store.record_received = times.wrap(  # type: ignore[method-assign]
            "job row commit (record_received)", record_received
        )
        store.mark_queued = times.wrap(  # type: ignore[method-assign]
            "mark queued commit (publisher thread)", store.mark_queued
        )
        if variant == "no-mark-queued":
            store.mark_queued = lambda job_ids, **_kwargs: len(list(job_ids))  # type: ignore[method-assign]
        # Written as the fragments arrive (reader thread); the handler commits it.
        listener._open_incoming = times.wrap(  # type: ignore[method-assign]
            "open spool file + write file meta (reader thread)", listener._open_incoming
        )
        IncomingFile.commit = times.wrap(  # type: ignore[method-assign]
            "spool commit: fsync of the tail + rename + dir fsync", original_commit
        )
        listener.handle_store = times.wrap("whole C-STORE handler", listener.handle_store)  # type: ignore[method-assign]
        service.start()
        template = inputs.input_file(kind, size)
        files = inputs.unique_copies(template, root / "send", photos)
        os.sync()
        codes, wall, process_cpu = send_with_storescu(port, "DERMPACS", kind, files, associations)
        time.sleep(0.5)  # the publisher finishes the burst
        service.stop()
    finally:
        listener_module.admit = original_admit  # type: ignore[assignment]
        listener_module.wait_for_messages = original_wait_for_messages  # type: ignore[assignment]
        IncomingFile.commit = original_commit  # type: ignore[method-assign]
        flush_redis()
        shutil.rmtree(root, ignore_errors=True)
    steps = times.summary()
    handler = steps.get("whole C-STORE handler", {}).get("total_s", 0.0)
    return {
        "kind": kind,
        "size": size,
        "photos": photos,
        "associations": associations,
        "variant": variant,
        "variant_description": VARIANTS[variant],
        "listener_max_pdu_size": max_pdu_size,
        "storescu_exit_codes": codes,
        "wall_s": round(wall, 3),
        "photos_per_second": round(photos / wall, 2),
        "listener_process_cpu_s": round(process_cpu, 3),
        "ms_per_photo": round(wall * 1000 / photos, 2),
        "handler_share_of_wall": round(handler / wall, 3) if wall else None,
        "steps": steps,
    }


def profile_bare_pynetdicom(
    kind: str,
    size: str,
    photos: int,
    associations: int = 1,
    *,
    durable: bool = True,
    bulk_read: bool = False,
) -> dict[str, Any]:
    """The floor under any pynetdicom listener: a handler that only writes the received bytes
    (with fsync and a folder fsync when ``durable``) and answers success. ``bulk_read``: with
    the listener's :class:`~dermpacs.intake.listener.BulkReadSocket` instead of pynetdicom's."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
    from pynetdicom.transport import ThreadedAssociationServer

    from dermpacs.imaging.sopclasses import ACCEPTED_TRANSFER_SYNTAXES, PHOTO_SOP_CLASSES
    from dermpacs.intake.listener import BulkReadRequestHandler

    root = Path(tempfile.mkdtemp(prefix="dermpacs-bench-bare-"))
    store_dir = root / "store"
    store_dir.mkdir()
    times = StepTimes()

    def handle(event: Any) -> int:
        data = event.encoded_dataset(include_meta=True)
        target = store_dir / f"{event.request.AffectedSOPInstanceUID}.dcm"
        with open(target, "wb") as handle_:
            handle_.write(data)
            if durable:
                handle_.flush()
                os.fsync(handle_.fileno())
        if durable:
            folder = os.open(store_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(Verification)
    for sop_class in PHOTO_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
    port = free_port()
    server = ae.make_server(
        (LOOPBACK, port),
        evt_handlers=[(evt.EVT_C_STORE, times.wrap("whole C-STORE handler", handle))],
        server_class=ThreadedAssociationServer,
        **({"request_handler": BulkReadRequestHandler} if bulk_read else {}),
    )
    # as AE.start_server(block=False) does, so that server.shutdown() finds it there
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ae._servers.append(server)
    try:
        files = inputs.unique_copies(inputs.input_file(kind, size), root / "send", photos)
        os.sync()
        codes, wall, cpu = send_with_storescu(port, "BARE", kind, files, associations)
    finally:
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "kind": kind,
        "size": size,
        "photos": photos,
        "associations": associations,
        "variant": ("bare-bulk" if bulk_read else "bare-pynetdicom")
        + ("-fsync" if durable else "-no-fsync"),
        "storescu_exit_codes": codes,
        "wall_s": round(wall, 3),
        "photos_per_second": round(photos / wall, 2),
        "listener_process_cpu_s": round(cpu, 3),
        "ms_per_photo": round(wall * 1000 / photos, 2),
        "steps": times.summary(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["camera", "native"], default="native")
    parser.add_argument("--size", choices=sorted(inputs.SIZES), default="vga")
    parser.add_argument("--photos", type=int, default=100)
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--max-pdu", type=int, default=0, help="listener.max_pdu_size")
    parser.add_argument(
        "--variants",
        default="as-is",
        help=f"comma-separated, taking turns {{--repeats}} times: {', '.join(VARIANTS)}, "
        "bare-pynetdicom-fsync, bare-pynetdicom-no-fsync, bare-bulk-fsync, bare-bulk-no-fsync",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    results = []
    for _ in range(args.repeats):
        for variant in [v for v in args.variants.split(",") if v]:
            if variant.startswith("bare-"):
                result = profile_bare_pynetdicom(
                    args.kind,
                    args.size,
                    args.photos,
                    args.associations,
                    durable=variant.endswith("-fsync") and "no-fsync" not in variant,
                    bulk_read=variant.startswith("bare-bulk"),
                )
            else:
                result = profile_listener(
                    args.kind,
                    args.size,
                    args.photos,
                    args.associations,
                    max_pdu_size=args.max_pdu,
                    variant=variant,
                )
            results.append(result)
            print(
                f"{variant:28s} {result['photos_per_second']:7.1f} photos/s "
                f"{result['ms_per_photo']:6.1f} ms/photo, CPU "
                f"{result['listener_process_cpu_s'] * 1000 / args.photos:5.1f} ms/photo",
                file=sys.stderr,
            )
    write_result(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
