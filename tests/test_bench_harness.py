"""The benchmark harness works: ``python -m bench --short`` runs every part on a handful of
small photos against real receivers, a real service and Orthanc, and writes its JSON and tables.

No time is asserted: this machine is shared and the short mode's figures mean nothing. What is
asserted is that every part ran, measured what it says (every receiver stored every photo,
every variant of the method produced stage timings, every photo reached Orthanc) and that the
report renders.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from tests import services

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_report_rewrites_only_the_block_between_its_markers(tmp_path: Path) -> None:
    document = tmp_path / "benchmarks.md"
    document.write_text(f"# Title\n\nHand-written.\n\n{report.START}\nold\n{report.END}\n\nTail.\n")
    report.write_into(document, f"{report.START}\nnew tables\n{report.END}\n")
    text = document.read_text()
    assert "Hand-written." in text and "Tail." in text and "new tables" in text
    assert "old" not in text and text.count(report.START) == 1

    fresh = tmp_path / "fresh.md"
    report.write_into(fresh, f"{report.START}\nfirst\n{report.END}\n")
    assert fresh.read_text().count("first") == 1


def test_short_run_measures_every_part_and_writes_its_report(tmp_path: Path) -> None:
    for tool in ("storescu", "storescp", "img2dcm", "Orthanc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make tools)")
    if not services.redis_available():
        pytest.skip("Redis does not answer on 127.0.0.1:6379")
    out = tmp_path / "results"
    document = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--short", "--out-dir", str(out), "--docs", str(document)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (result_path,) = out.glob("*-short.json")
    result = json.loads(result_path.read_text())
    parts = result["parts"]
    assert set(parts) >= {"receive", "inference", "end_to_end"}

    receive = parts["receive"]
    assert len(receive["rows"]) == 4
    for row in receive["rows"]:
        # dermpacs with one listening process and with two (listener.processes = 2)
        for name in ("dermpacs", "dermpacs-2p", "storescp", "orthanc"):
            cell = row["receivers"][name]
            assert len(cell["seconds"]) == receive["repeats"]
            assert cell["photos_per_second_median"] > 0
            # CPU counted: the senders' (getrusage) and Redis's (dermpacs publishes there) to
            # the microsecond; the receiver's in clock ticks, which a few small photos may
            # not fill
            assert cell["receiver_cpu_ms_per_photo"] >= 0
            assert cell["sender_cpu_ms_per_photo"] > 0
            if name.startswith("dermpacs"):
                assert cell["broker_cpu_ms_per_photo"] > 0

    inference = parts["inference"]
    assert {r["variant"] for r in inference["rows"]} == {"old", "onnx", "worker"}
    for row in inference["rows"]:
        for stage in (
            "decode",
            "segmentation",
            "mask",
            "crops",
            "classification",
            "build_segmentation",
            "build_report",
            "build_overlay",
            "write_fsync",
        ):
            assert row["ms"][stage] > 0
        assert row["ms"]["method_total"] >= row["ms"]["segmentation"]
        assert row["ms"]["worker_total"] >= row["ms"]["method_total"]
        # the worker's segmentation input came from the codec's reduced decode
        assert (row["preview_shape"] is not None) == (row["variant"] == "worker")
    for check in inference["checks"].values():
        assert check["onnxruntime_vs_eager_networks"]["within_tolerance"]
        assert check["onnx_vs_old"]["within_tolerance"]
        assert check["worker_vs_old"]["within_tolerance"]

    (run,) = parts["end_to_end"]["runs"]
    assert run["backlog"]["delivered"] == run["backlog"]["photos"]
    assert run["steady"]["delivered"] == run["steady"]["photos"]
    assert run["steady"]["latency_p50_s"] > 0
    assert run["orthanc_instances"] >= 3 * (run["backlog"]["photos"] + run["steady"]["photos"])

    text = document.read_text()
    assert text.startswith(report.START) and text.rstrip().endswith(report.END)
    for heading in ("### Receive", "### Inference", "### End to end", "### GPU"):
        assert heading in text
