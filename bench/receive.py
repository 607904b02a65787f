"""Receive: photos per second acknowledged, dermpacs beside dcmtk ``storescp`` and Orthanc.

For each kind of photo (12-megapixel camera JPEG from ``img2dcm``; 640 x 480 uncompressed RGB)
a burst of distinct photos is sent by dcmtk ``storescu`` (``TCP_NODELAY=1``; ``-xy`` proposes
the JPEG's own transfer syntax) over one association, then over several concurrent
associations (one ``storescu`` process each, started together), to each of three receivers
running at the same time:

* ``dermpacs listen``: admits each photo from its header, writes it to the spool (write,
  fsync, rename, fsync of the folder), commits its job row (SQLite in WAL mode with
  ``synchronous=FULL``), then answers success; the task is published to Redis in the background;
* dcmtk ``storescp`` tuned as FIELD-NOTES says (``TCP_NODELAY=1``, ``--max-pdu 131072``), one
  forked child per association, writing files without fsync;
* Orthanc (``TCP_NODELAY=1``, ``MaximumPduLength`` 131072), which stores durably by default.

The time is from starting the ``storescu`` processes to the last one exiting, which happens
after the last C-STORE response; photos/s = photos / time. Each receiver's stored count is
checked afterwards, so a burst that was refused or lost counts as a failure, not as speed.
Receivers take turns within each repetition so that a noisy neighbour on the machine hurts
all three alike; the median of the repetitions is reported with the spread.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import inputs
from bench.cli import exit_on_sigterm, write_result
from bench.machine import machine_facts
from bench.models import choose_model
from bench.services import (
    NODELAY,
    DermpacsListener,
    OrthancServer,
    Receiver,
    StoreSCP,
    flush_redis,
    redis_available,
    redis_cpu,
    redis_url,
    storescu_argv,
    wait_until,
)

# Targets of issue 7: ahead of Orthanc, at least half of tuned storescp.
TARGET_VS_STORESCP = 0.5


@dataclass(frozen=True)
class Burst:
    """One kind of burst: which photos, how many, over how many associations."""

    kind: str  # "camera" or "native"
    size: str  # a key of inputs.SIZES
    photos: int
    associations: int

    @property
    def label(self) -> str:
        what = {"camera": "JPEG (img2dcm)", "native": "uncompressed RGB"}[self.kind]
        size = inputs.SIZES[self.size]
        return (
            f"{size.columns}x{size.rows} {what}, {self.photos} photos, "
            f"{self.associations} association{'s' if self.associations > 1 else ''}"
        )


def default_bursts(*, short: bool) -> list[Burst]:
    if short:
        return [
            Burst("camera", "1mp", 4, 1),
            Burst("camera", "1mp", 4, 2),
            Burst("native", "vga", 6, 1),
            Burst("native", "vga", 6, 2),
        ]
    return [
        Burst("camera", "12mp", 40, 1),
        Burst("camera", "12mp", 40, 4),
        Burst("native", "vga", 200, 1),
        Burst("native", "vga", 200, 4),
    ]


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and its descendants: those running (from /proc) and
    those that ended and were waited for (counted in their parent's children's times), such
    as storescp's forked children and dermpacs's receiving and publisher processes."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        # utime, stime, cutime, cstime (proc(5) fields 14-17)
        times[child] = sum(int(v) for v in fields[11:15]) / _CLOCK_TICKS
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        total += times.get(current, 0.0)
        pending += children.get(current, [])
    return total


@dataclass
class BurstCost:
    """What one burst took: wall-clock seconds, and CPU seconds of each party."""

    seconds: float
    receiver_cpu: float  # the receiver's processes, from the first send to settled
    sender_cpu: float  # the storescu processes
    broker_cpu: float  # Redis (dermpacs publishes each photo's task there)


SETTLE = 0.5  # seconds after the last response for work the receiver does afterwards


def send_burst(receiver: Receiver, burst: Burst, files: Sequence[Path]) -> BurstCost:
    """Send ``files`` over ``burst.associations`` concurrent storescu processes.

    The time is to the last storescu exiting; the CPU is counted from the start to
    :data:`SETTLE` seconds after that, so that what a receiver does after answering (dermpacs
    publishing, Orthanc indexing) is in it too.

    Raises
    ------
    RuntimeError
        A storescu failed, or the receiver did not store every photo.
    """
    groups = [list(files[i :: burst.associations]) for i in range(burst.associations)]
    before = receiver.stored_count()
    env = {**os.environ, **NODELAY}
    server = receiver.processes[0].pid
    cpu_before = process_tree_cpu(server)
    broker_before = redis_cpu()
    senders_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    senders = [
        subprocess.Popen(
            storescu_argv(
                receiver.port,
                group,
                called_aet=receiver.ae_title,
                options=inputs.storescu_syntax_options(burst.kind),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for group in groups
        if group
    ]
    outputs = [sender.communicate(timeout=600)[0] for sender in senders]
    elapsed = time.perf_counter() - started
    senders_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for sender, output in zip(senders, outputs, strict=True):
        text = output.decode(errors="replace")
        if sender.returncode != 0 or "Failed" in text or "Error" in text:
            raise RuntimeError(
                f"storescu to {receiver.name} failed ({sender.returncode}): {text[-2000:]}"
            )
    expected = before + len(files)
    try:
        # dermpacs and storescp have the file before they answer; this only waits for the
        # directory listing, not for work done after the response.
        wait_until(
            lambda: receiver.stored_count() >= expected,
            timeout=30,
            interval=0.05,
            what=f"{receiver.name} to hold {expected} objects",
        )
    except TimeoutError as exc:
        raise RuntimeError(f"{exc} (has {receiver.stored_count()})") from exc
    time.sleep(max(0.0, started + elapsed + SETTLE - time.perf_counter()))
    return BurstCost(
        seconds=elapsed,
        receiver_cpu=process_tree_cpu(server) - cpu_before,
        sender_cpu=(senders_after.ru_utime + senders_after.ru_stime)
        - (senders_before.ru_utime + senders_before.ru_stime),
        broker_cpu=redis_cpu() - broker_before,
    )


@dataclass
class BurstResult:
    burst: Burst
    receiver: str
    costs: list[BurstCost]

    @property
    def photos_per_second(self) -> list[float]:
        return [self.burst.photos / c.seconds for c in self.costs]

    def _ms_per_photo(self, seconds: list[float]) -> float:
        return round(statistics.median(seconds) * 1000 / self.burst.photos, 2)

    def summary(self) -> dict[str, Any]:
        rates = self.photos_per_second
        return {
            "receiver": self.receiver,
            "burst": asdict(self.burst),
            "label": self.burst.label,
            "seconds": [round(c.seconds, 4) for c in self.costs],
            "photos_per_second_median": round(statistics.median(rates), 2),
            "photos_per_second_min": round(min(rates), 2),
            "photos_per_second_max": round(max(rates), 2),
            # CPU per photo, medians over the repetitions: the receiver's processes, the
            # storescu senders, and Redis (dermpacs's broker; idle for the others).
            "receiver_cpu_ms_per_photo": self._ms_per_photo([c.receiver_cpu for c in self.costs]),
            "sender_cpu_ms_per_photo": self._ms_per_photo([c.sender_cpu for c in self.costs]),
            "broker_cpu_ms_per_photo": self._ms_per_photo([c.broker_cpu for c in self.costs]),
        }


def run_receive(
    *,
    short: bool = False,
    repeats: int | None = None,
    bursts: Sequence[Burst] | None = None,
    workdir: Path | None = None,
    profile: bool = False,
    listener_processes: Sequence[int] = (1, 2),
) -> dict[str, Any]:
    """Run the receive benchmark; returns a JSON-ready result. dermpacs runs once for each
    ``listener_processes`` count (``listener.processes``)."""
    if not redis_available():
        raise RuntimeError(
            f"Redis does not answer at {redis_url()}: the dermpacs listener publishes tasks to it"
        )
    bursts = list(bursts or default_bursts(short=short))
    repeats = repeats or (1 if short else 5)
    model = choose_model()
    own_dir = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="dermpacs-bench-receive-"))
    started = time.time()
    templates = {(b.kind, b.size): inputs.input_file(b.kind, b.size) for b in bursts}
    flush_redis()
    receivers: list[Receiver] = [
        DermpacsListener(
            root / f"dermpacs-{n}p", model=model.section, broker_url=redis_url(), processes=n
        )
        for n in listener_processes
    ]
    receivers += [
        StoreSCP(root / "storescp"),
        OrthancServer(root / "orthanc"),
    ]
    results: dict[tuple[int, str], BurstResult] = {}
    profiles: list[str] = []
    try:
        for receiver in receivers:
            receiver.start()
        for index, burst in enumerate(bursts):
            for repeat in range(repeats):
                for turn in range(len(receivers)):
                    # rotate who goes first, so no receiver always meets a warm or cold cache
                    receiver = receivers[(turn + repeat) % len(receivers)]
                    files = inputs.unique_copies(
                        templates[(burst.kind, burst.size)],
                        root / "send" / f"{index}-{repeat}-{receiver.name}",
                        burst.photos,
                    )
                    os.sync()  # the copies' own writeback must not land in the timed window
                    if profile and receiver.name.startswith("dermpacs") and repeat == 0:
                        profiles.append(_profiled_burst(receiver, burst, files, root, index))
                        files = inputs.unique_copies(
                            templates[(burst.kind, burst.size)],
                            root / "send" / f"{index}-{repeat}-{receiver.name}-timed",
                            burst.photos,
                        )
                        os.sync()
                    cost = send_burst(receiver, burst, files)
                    results.setdefault(
                        (index, receiver.name), BurstResult(burst, receiver.name, [])
                    ).costs.append(cost)
                    shutil.rmtree(files[0].parent, ignore_errors=True)
    finally:
        logs = {r.name: r.logs()[-1500:] for r in receivers}
        for receiver in receivers:
            receiver.stop()
        flush_redis()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    rows = []
    names = [r.name for r in receivers]
    for index, burst in enumerate(bursts):
        by_name = {name: results[(index, name)].summary() for name in names}
        storescp = by_name["storescp"]["photos_per_second_median"]
        orthanc = by_name["orthanc"]["photos_per_second_median"]
        variants = {}
        for name in names:
            if name.startswith("dermpacs"):
                rate = by_name[name]["photos_per_second_median"]
                variants[name] = {
                    "vs_storescp": round(rate / storescp, 3),
                    "vs_orthanc": round(rate / orthanc, 3),
                    "meets_target": rate > orthanc and rate >= TARGET_VS_STORESCP * storescp,
                }
        best = max(variants, key=lambda n: by_name[n]["photos_per_second_median"])
        rows.append(
            {
                "label": burst.label,
                "burst": asdict(burst),
                "receivers": by_name,
                "dermpacs_variants": variants,
                "best_dermpacs": best,
                "dermpacs_vs_storescp": variants[best]["vs_storescp"],
                "dermpacs_vs_orthanc": variants[best]["vs_orthanc"],
                "meets_target": variants[best]["meets_target"],
            }
        )
    return {
        "benchmark": "receive",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "repeats": repeats,
        "short": short,
        "model": model.description,
        "inputs": {
            f"{kind}-{size}": inputs.describe_file(path) for (kind, size), path in templates.items()
        },
        "receivers": {r.name: r.description for r in receivers},
        "rows": rows,
        "profiles": profiles,
        "log_tails": logs if any(not row["meets_target"] for row in rows) else {},
        "machine": machine_facts(),
    }


def _profiled_burst(
    receiver: Receiver, burst: Burst, files: Sequence[Path], root: Path, index: int
) -> str:
    """Send one burst while py-spy samples the listener; returns the flame graph's path."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = root.parent / f"dermpacs-receive-profile-{index}-{burst.kind}-{burst.associations}.txt"
    pid = receiver.processes[0].pid
    sampler = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    time.sleep(1.0)  # py-spy attaches
    send_burst(receiver, burst, files)
    sampler.terminate()
    sampler.wait(30)
    return str(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="a handful of small photos")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--photos", type=int, default=None, help="photos per burst")
    parser.add_argument("--profile", action="store_true", help="py-spy the dermpacs listener")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument(
        "--listener-processes",
        default="1,2",
        help="dermpacs runs once per count of listener.processes (comma-separated)",
    )
    args = parser.parse_args(argv)
    exit_on_sigterm()
    bursts = default_bursts(short=args.short)
    if args.photos:
        bursts = [Burst(b.kind, b.size, args.photos, b.associations) for b in bursts]
    result = run_receive(
        short=args.short,
        repeats=args.repeats,
        bursts=bursts,
        profile=args.profile,
        listener_processes=[int(n) for n in args.listener_processes.split(",") if n],
    )
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
