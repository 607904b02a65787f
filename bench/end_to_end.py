"""End to end: from dcmtk ``storescu`` sending a photo to its SEG, SR and overlay stored in Orthanc.

The service runs as in production, each part its own process: ``dermpacs listen`` (Redis
broker, SQLite job store), ``dermpacs worker --queues inference`` with one or two prefork
processes, ``dermpacs worker --queues dispatch`` (threads), and Orthanc as the PACS. Each photo
is a camera file (img2dcm JPEG) in its own study, sent by its own ``storescu`` (one association
per photo, as a camera sends).

A photo's latency is from the moment its ``storescu`` starts to the moment the job store marks
it delivered, which happens when Orthanc has acknowledged all three objects (the job's audit
trail holds that time). Orthanc's instance count is checked at the end.

For one and for two worker processes:

1. warm-up: a few photos, until delivered (each worker process loads the networks on its first
   task);
2. backlog: a burst of photos sent as fast as the listener takes them; the time from the first
   send to the last delivery is the drain time, and photos / drain time the highest rate the
   service sustains on this machine. When the drain does not finish within the time budget the
   result says how many were delivered and the rate so far (the drain time is then extrapolated
   and marked so);
3. on a fresh service (so that no backlog is left in the queue), warmed again: steady arrivals
   at a fraction of that rate for a fixed number of photos: p50 and p95 latency.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import inputs
from bench.cli import exit_on_sigterm, write_result
from bench.machine import machine_facts
from bench.models import choose_model
from bench.services import (
    LOOPBACK,
    NODELAY,
    OrthancServer,
    ServiceProcess,
    c_echo,
    dermpacs_argv,
    flush_redis,
    free_port,
    redis_available,
    redis_url,
    storescu_argv,
    wait_until,
    write_toml,
)

STEADY_FRACTION = 0.7  # steady arrivals at this share of the measured drain rate


@dataclass(frozen=True)
class EndToEndPlan:
    size: str = "12mp"
    workers: tuple[int, ...] = (1, 2)
    warmup: int = 2
    backlog: int = 500
    backlog_budget_s: float = 600.0
    steady: int = 30
    steady_budget_s: float = 300.0


def short_plan() -> EndToEndPlan:
    return EndToEndPlan(
        size="1mp",
        workers=(1,),
        warmup=1,
        backlog=2,
        backlog_budget_s=120,
        steady=2,
        steady_budget_s=60,
    )


class Service:
    """Listener, inference worker(s), dispatch worker and Orthanc, on loopback."""

    def __init__(self, root: Path, model: dict[str, Any], inference_processes: int) -> None:
        self.root = root
        self.port = free_port()
        self.run_id = uuid.uuid4().hex[:8]
        self.orthanc = OrthancServer(root / "orthanc")
        self.inference_processes = inference_processes
        self.model = model
        self.config = root / "dermpacs.toml"
        self.processes: list[ServiceProcess] = []

    def start(self) -> Service:
        self.orthanc.start()
        write_toml(
            self.config,
            {
                "listener": {
                    "ae_title": "DERMPACS",
                    "host": LOOPBACK,
                    "port": self.port,
                    "max_associations": 64,
                },
                "broker": {"url": redis_url()},
                "storage": {"root": str(self.root / "var")},
                "model": self.model,
                "queues": {
                    "inference": {
                        "name": f"bench-inference-{self.run_id}",
                        "concurrency": self.inference_processes,
                    },
                    "dispatch": {"name": f"bench-dispatch-{self.run_id}", "concurrency": 2},
                },
                "destinations": [
                    {
                        "name": "orthanc",
                        "kind": "dicom",
                        "ae_title": self.orthanc.ae_title,
                        "host": LOOPBACK,
                        "port": self.orthanc.port,
                        "objects": ["seg", "sr", "overlay"],
                    }
                ],
            },
        )
        env = {"PYTHONUNBUFFERED": "1"}
        listener = ServiceProcess(
            dermpacs_argv("listen", self.config), log_path=self.root / "listen.log", env=env
        )
        inference = ServiceProcess(
            dermpacs_argv(
                "worker",
                self.config,
                "--queues",
                f"bench-inference-{self.run_id}",
                "--concurrency",
                str(self.inference_processes),
                "--pool",
                "prefork",
            ),
            log_path=self.root / "worker-inference.log",
            env=env,
        )
        dispatch = ServiceProcess(
            dermpacs_argv(
                "worker",
                self.config,
                "--queues",
                f"bench-dispatch-{self.run_id}",
                "--concurrency",
                "2",
                "--pool",
                "threads",
            ),
            log_path=self.root / "worker-dispatch.log",
            env=env,
        )
        self.processes = [listener, inference, dispatch]
        try:
            wait_until(
                lambda: c_echo(self.port, "DERMPACS"), timeout=120, interval=0.2, what="listener"
            )
            for worker in (inference, dispatch):
                wait_until(
                    lambda w=worker: "ready." in w.log(),  # type: ignore[misc]
                    timeout=180,
                    interval=0.2,
                    what="worker",
                )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.logs()}") from exc
        return self

    def logs(self) -> str:
        return "\n".join(f"--- {p.argv[3:6]}\n{p.log()[-3000:]}" for p in self.processes)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop(timeout=60)
        self.processes.clear()
        self.orthanc.stop()

    def send(self, path: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            storescu_argv(
                self.port,
                [path],
                called_aet="DERMPACS",
                options=inputs.storescu_syntax_options("camera"),
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **NODELAY},
        )

    def delivered_times(self, sop_instance_uids: Sequence[str]) -> dict[str, float]:
        """Epoch seconds at which each photo's job became ``delivered`` (those that did)."""
        import sqlite3

        path = self.root / "var" / "jobs.sqlite3"
        if not path.is_file():
            candidates = list((self.root / "var").glob("*.sqlite3"))
            candidates = [c for c in candidates if "broker" not in c.name]
            if not candidates:
                return {}
            path = candidates[0]
        wanted = set(sop_instance_uids)
        found: dict[str, float] = {}
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            rows = db.execute(
                "SELECT job.sop_instance_uid, job_event.at FROM job "
                "JOIN job_event ON job_event.job_id = job.id "
                "WHERE job_event.to_state = 'delivered'"
            ).fetchall()
        for sop, at in rows:
            if sop in wanted:
                found[sop] = _epoch(at)
        return found

    def failed_count(self) -> int:
        import sqlite3

        path = self.root / "var" / "jobs.sqlite3"
        if not path.is_file():
            return 0
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            (count,) = db.execute("SELECT count(*) FROM job WHERE state = 'failed'").fetchone()
        return int(count)


def _epoch(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).replace("Z", "+00:00")
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        from datetime import UTC

        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _sop(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _wait_delivered(service: Service, sops: Sequence[str], budget_s: float) -> dict[str, float]:
    deadline = time.monotonic() + budget_s
    delivered: dict[str, float] = {}
    while time.monotonic() < deadline:
        delivered = service.delivered_times(sops)
        if len(delivered) >= len(sops):
            break
        if service.failed_count():
            raise RuntimeError(f"jobs failed during the benchmark\n{service.logs()}")
        time.sleep(0.5)
    return delivered


def _send_all(service: Service, files: Sequence[Path]) -> dict[str, float]:
    """Send each file on its own association, as fast as possible, a few at a time.

    Returns when every storescu has exited; the value is each photo's send start (epoch s).
    """
    sent: dict[str, float] = {}
    running: list[tuple[subprocess.Popen[bytes], str]] = []
    for path in files:
        while len(running) >= 8:
            _reap(running)
        sop = _sop(path)
        sent[sop] = time.time()
        running.append((service.send(path), sop))
    while running:
        _reap(running)
    return sent


def _reap(running: list[tuple[subprocess.Popen[bytes], str]]) -> None:
    process, sop = running[0]
    _, errors = process.communicate(timeout=300)
    if process.returncode != 0:
        raise RuntimeError(f"storescu failed for {sop}: {errors.decode(errors='replace')}")
    running.pop(0)


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]


def _started_and_warm(
    root: Path, model: dict[str, Any], plan: EndToEndPlan, processes: int, template: Path
) -> tuple[Service, float, int]:
    """A fresh service, warmed: every worker process has loaded the networks (its first task
    does that). Returns the service, its start-up time and the photos it delivered."""
    service = Service(root, model, processes)
    started = time.time()
    try:
        service.start()
        startup_s = time.time() - started
        warm = inputs.unique_copies(
            template, root / "send-warm", plan.warmup * processes, study_per_copy=True
        )
        warm_sent = _send_all(service, warm)
        warm_done = _wait_delivered(service, list(warm_sent), 300)
        if len(warm_done) < len(warm_sent):
            raise RuntimeError(f"warm-up photos were not delivered\n{service.logs()}")
    except BaseException:
        service.stop()
        raise
    return service, startup_s, len(warm_done)


def measure_backlog(
    service: Service, plan: EndToEndPlan, template: Path, folder: Path
) -> dict[str, Any]:
    """Phase 2: the backlog's drain time and the sustained rate."""
    backlog = inputs.unique_copies(template, folder, plan.backlog, study_per_copy=True)
    os.sync()
    backlog_sent = _send_all(service, backlog)
    first = min(backlog_sent.values())
    burst_s = time.time() - first  # until the last storescu had its answer
    delivered = _wait_delivered(service, list(backlog_sent), plan.backlog_budget_s)
    done = len(delivered)
    elapsed = (max(delivered.values()) if done else time.time()) - first
    complete = done == plan.backlog
    rate = done / elapsed if elapsed > 0 and done else 0.0
    return {
        "photos": plan.backlog,
        "delivered": done,
        "complete": complete,
        "budget_s": plan.backlog_budget_s,
        "send_burst_s": round(burst_s, 2),
        "drain_s": round(elapsed, 1) if complete else None,
        "drain_s_extrapolated": None if complete or not rate else round(plan.backlog / rate, 1),
        "photos_per_second": round(rate, 3),
    }


def measure_steady(
    service: Service, plan: EndToEndPlan, template: Path, folder: Path, rate: float
) -> dict[str, Any]:
    """Phase 3: latency at a steady arrival rate (on a service with an empty queue)."""
    steady = inputs.unique_copies(template, folder, plan.steady, study_per_copy=True)
    os.sync()
    sops = [_sop(p) for p in steady]
    sent: dict[str, float] = {}
    steady_started = time.time()
    running: list[tuple[subprocess.Popen[bytes], str]] = []
    for index, (path, sop) in enumerate(zip(steady, sops, strict=True)):
        due = steady_started + index / rate
        while time.time() < due:
            time.sleep(min(0.01, max(0.0, due - time.time())))
        sent[sop] = time.time()
        running.append((service.send(path), sop))
        while running and running[0][0].poll() is not None:
            _reap(running)
    while running:
        _reap(running)
    arrived = _wait_delivered(service, sops, plan.steady_budget_s)
    latencies = [arrived[s] - sent[s] for s in sops if s in arrived]
    return {
        "photos": plan.steady,
        "delivered": len(arrived),
        "rate_per_second": round(rate, 3),
        "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "latency_p95_s": round(percentile(latencies, 0.95), 2) if latencies else None,
        "latency_max_s": round(max(latencies), 2) if latencies else None,
    }


def _check_stored(service: Service, delivered: int) -> int:
    stored = service.orthanc.stored_count()
    if stored < 3 * delivered:
        raise RuntimeError(f"Orthanc holds {stored} objects, {3 * delivered} were delivered")
    return stored


def run_one(
    root: Path, model: dict[str, Any], plan: EndToEndPlan, processes: int
) -> dict[str, Any]:
    """Backlog, then steady arrivals at a share of the backlog's rate, with ``processes``
    inference worker processes. When the backlog did not drain within its budget, the steady
    phase runs on a fresh service, so that no left-over backlog sits in front of its photos."""
    template = inputs.input_file("camera", plan.size)
    service, startup_s, warmed = _started_and_warm(root / "a", model, plan, processes, template)
    stored = 0
    try:
        backlog = measure_backlog(service, plan, template, root / "send-backlog")
        rate = backlog["photos_per_second"]
        steady_rate = STEADY_FRACTION * rate if rate else 0.2
        if not backlog["complete"]:
            stored += _check_stored(service, warmed + backlog["delivered"])
            service.stop()
            flush_redis()
            service, _, warmed_again = _started_and_warm(
                root / "b", model, plan, processes, template
            )
            warmed = warmed_again
            backlog_done = 0
        else:
            backlog_done = backlog["delivered"]
        steady = measure_steady(service, plan, template, root / "send-steady", steady_rate)
        stored += _check_stored(service, warmed + backlog_done + steady["delivered"])
    finally:
        service.stop()
        flush_redis()
    return {
        "inference_worker_processes": processes,
        "startup_s": round(startup_s, 1),
        "backlog": backlog,
        "steady": steady,
        "orthanc_instances": stored,
    }


def run_end_to_end(
    *, short: bool = False, plan: EndToEndPlan | None = None, workdir: Path | None = None
) -> dict[str, Any]:
    """Run the end-to-end benchmark; returns a JSON-ready result."""
    if not redis_available():
        raise RuntimeError(f"Redis does not answer at {redis_url()}")
    plan = plan or (short_plan() if short else EndToEndPlan())
    model = choose_model()
    started = time.time()
    own_dir = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="dermpacs-bench-e2e-"))
    flush_redis()
    results = []
    try:
        for processes in plan.workers:
            results.append(run_one(root / f"workers-{processes}", model.section, plan, processes))
    finally:
        flush_redis()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "benchmark": "end_to_end",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "short": short,
        "plan": plan.__dict__,
        "input": inputs.describe_file(inputs.input_file("camera", plan.size)),
        "model": model.description,
        "runs": results,
        "machine": machine_facts(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true")
    parser.add_argument("--size", default=None, choices=sorted(inputs.SIZES))
    parser.add_argument("--backlog", type=int, default=None)
    parser.add_argument("--backlog-budget", type=float, default=None, help="seconds")
    parser.add_argument("--steady", type=int, default=None)
    parser.add_argument("--workers", default="", help="e.g. 1,2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    plan = short_plan() if args.short else EndToEndPlan()
    changes: dict[str, Any] = {}
    if args.size:
        changes["size"] = args.size
    if args.backlog:
        changes["backlog"] = args.backlog
    if args.backlog_budget:
        changes["backlog_budget_s"] = args.backlog_budget
    if args.steady:
        changes["steady"] = args.steady
    if args.workers:
        changes["workers"] = tuple(int(w) for w in args.workers.split(","))
    plan = EndToEndPlan(**{**plan.__dict__, **changes})
    result = run_end_to_end(short=args.short, plan=plan)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
