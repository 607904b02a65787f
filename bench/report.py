"""Markdown tables of a benchmark run, and their place in docs/benchmarks.md.

The tables go between two markers in the document; the text around them is written by hand
and kept. Every table says which run it comes from (date, machine, command, commit).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

START = "<!-- bench:results:start (written by `python -m bench`; edit the text outside) -->"
END = "<!-- bench:results:end -->"

STAGES = (
    ("decode", "decode"),
    ("resize", "resize"),
    ("segmentation", "segmentation"),
    ("mask", "mask to source size"),
    ("crops", "crops"),
    ("classification", "classification"),
    ("skin_tone", "skin tone"),
    ("quality", "quality"),
)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows
    ]
    return lines + [""]


def machine_section(machine: Mapping[str, Any], title: str = "Machine and run") -> list[str]:
    load = machine.get("load_average_1_5_15") or []
    return [
        f"**{title}:** {machine.get('date')}; {machine.get('nproc')} cores "
        f"({machine.get('cpu_model')}), {machine.get('memory_gib')} GiB RAM, load average "
        f"{' / '.join(str(v) for v in load)} (1/5/15 min) when this part ended; Linux "
        f"{machine.get('kernel')}, Python {machine.get('python')}, torch {machine.get('torch')} "
        f"({machine.get('torch_threads')} threads), {machine.get('dcmtk')}, "
        f"{machine.get('orthanc')}; commit `{machine.get('git_commit')}`; "
        f"command `{machine.get('command')}`.",
        "",
    ]


def receive_section(result: Mapping[str, Any]) -> list[str]:
    lines = ["### Receive: photos/s acknowledged", ""]
    if "error" in result:
        return lines + [f"Not measured: {result['error']}", ""]
    lines += [
        f"{result['repeats']} repetition(s) per cell, receivers taking turns; median photos/s "
        "[slowest–fastest]. dermpacs fsyncs every photo and commits its job row before "
        "answering; storescp writes files without fsync; Orthanc stores durably.",
        "",
    ]
    rows = []
    for row in result["rows"]:
        cells = []
        for name in ("dermpacs", "storescp", "orthanc"):
            r = row["receivers"][name]
            cells.append(
                f"{r['photos_per_second_median']:.1f} "
                f"[{r['photos_per_second_min']:.0f}–{r['photos_per_second_max']:.0f}]"
            )
        rows.append(
            [
                row["label"],
                *cells,
                f"{row['dermpacs_vs_storescp']:.2f}",
                f"{row['dermpacs_vs_orthanc']:.2f}",
                "met" if row["meets_target"] else "**missed**",
            ]
        )
    lines += _table(
        [
            "burst",
            "dermpacs",
            "storescp (tuned)",
            "Orthanc",
            "dermpacs / storescp",
            "dermpacs / Orthanc",
            "target (>Orthanc, ≥0.5×storescp)",
        ],
        rows,
    )
    inputs_text = "; ".join(
        f"{name}: {d['columns']}x{d['rows']}, {d['transfer_syntax']}, "
        f"{d['file_bytes'] / 1e6:.2f} MB"
        for name, d in result.get("inputs", {}).items()
    )
    lines += [f"Inputs: {inputs_text}.", ""]
    lines += ["Receivers: " + "; ".join(f"{k}: {v}" for k, v in result["receivers"].items()), ""]
    lines += machine_section(result["machine"])
    return lines


def inference_section(result: Mapping[str, Any]) -> list[str]:
    lines = ["### Inference: milliseconds per photo, by stage", ""]
    if "error" in result:
        return lines + [f"Not measured: {result['error']}", ""]
    trained = "" if result.get("model_trained") else " **(untrained: timings only)**"
    lines += [
        f"Networks: {result['model']}{trained}. Analysis long side {result['analysis_long_side']} "
        f"px, crops {result['crop_size']} px. Camera JPEG (img2dcm) photos, one at a time; "
        f"median of {result['repeats']} runs after a warm-up (fastest run in brackets). "
        "'reduced' decodes the JPEG by DCT scaling to the smallest long side that keeps every "
        "crop at least the classifier's input size. 'method' is parse + decode + the Analyser "
        "(everything up to the findings); SEG/SR/overlay building is listed apart.",
        "",
    ]
    header = [
        "size",
        "networks",
        "decode",
        "decoded",
        *[label for key, label in STAGES[1:]],
        "method total",
        "SEG+SR+overlay",
    ]
    rows = []
    for row in result["rows"]:
        ms, fast = row["ms"], row["ms_min"]
        rows.append(
            [
                f"{row['size']} ({row['file_bytes'] / 1e6:.1f} MB)",
                row["backend"],
                f"{ms.get('decode', 0):.0f} ({row['decode']})",
                "x".join(str(v) for v in reversed(row["decoded_shape"])),
                *[f"{ms.get(key, 0):.0f}" for key, _ in STAGES[1:]],
                f"**{ms['method_total']:.0f}** ({fast['method_total']:.0f})",
                f"{ms['results_seg_sr_overlay']:.0f}" if "results_seg_sr_overlay" in ms else "–",
            ]
        )
    lines += _table(header, rows)
    failures = sorted({r["results_error"] for r in result["rows"] if r.get("results_error")})
    for failure in failures:
        lines += [f"**Result objects could not be built:** {failure}", ""]
    built = [r for r in result["rows"] if "build_segmentation" in r["ms"]]
    if built:
        lines += ["Result objects (eager rows, full decode), ms: ", ""]
        lines += _table(
            ["size", "SEG", "SR", "overlay", "write 3 files + fsync", "bytes written"],
            [
                [
                    r["size"],
                    f"{r['ms']['build_segmentation']:.0f}",
                    f"{r['ms']['build_report']:.0f}",
                    f"{r['ms']['build_overlay']:.0f}",
                    f"{r['ms']['write_results_fsync']:.0f}",
                    f"{r['ms']['results_bytes'] / 1e6:.1f} MB",
                ]
                for r in built
                if r["backend"] == "eager"
            ],
        )
    target = result["target"]
    largest = [r for r in result["rows"] if r["size"] == target["size"]]
    best = min(largest, key=lambda r: r["ms"]["method_total"])  # by median, the robust one
    met = best["ms"]["method_total"] < target["seconds"] * 1000
    fastest_met = best["ms_min"]["method_total"] < target["seconds"] * 1000
    lines += [
        f"Target, whole method < {target['seconds']} s per {target['size']} photo: baseline "
        f"(eager PyTorch, full decode) {target['baseline_ms_median']:.0f} ms median "
        f"({target['baseline_ms_min']:.0f} fastest); best ({best['backend']}, "
        f"{best['decode']} decode) {best['ms']['method_total']:.0f} ms median "
        f"({best['ms_min']['method_total']:.0f} fastest): "
        f"{'met' if met else '**missed**'} on the median, "
        f"{'met' if fastest_met else '**missed**'} on the fastest run.",
        "",
    ]
    networks = result.get("networks_interleaved")
    if networks:
        seg = (networks["segmentation_eager"], networks["segmentation_onnxruntime"])
        cls = (networks["classifier_eager"], networks["classifier_onnxruntime"])
        lines += [
            f"Networks alone, taking turns call by call ({networks['calls_each']} calls each), "
            f"fastest / median ms: segmentation {'x'.join(map(str, networks['input']))} eager "
            f"{seg[0]['min_ms']:.0f} / {seg[0]['median_ms']:.0f}, ONNX Runtime "
            f"{seg[1]['min_ms']:.0f} / {seg[1]['median_ms']:.0f}; classifier on "
            f"{networks['crops']} crops eager {cls[0]['min_ms']:.0f} / {cls[0]['median_ms']:.0f},"
            f" ONNX Runtime {cls[1]['min_ms']:.0f} / {cls[1]['median_ms']:.0f}.",
            "",
        ]
    classifier = result.get("classifier_batch_ms") or {}
    if classifier:
        lines += [
            "Classifier alone, one batch: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.0f} ms" for k, v in classifier.items())
            + ".",
            "",
        ]
    check_rows = []
    for size, check in result["checks"].items():
        net = check["onnxruntime_vs_eager_networks"]
        method = check["onnxruntime_vs_eager_method_full_decode"]
        reduced = check["reduced_vs_full_decode_eager"]
        traced = check.get("traced_python_numpy_peak_mib") or {"full": None, "reduced": None}
        check_rows.append(
            [
                size,
                f"{net['segmentation_logit_max_abs_diff']:.2g} (logit std "
                f"{net['segmentation_logit_std']:.2g})",
                f"{net['classifier_logit_max_abs_diff']:.2g}",
                f"{net['segmentation_label_agreement']:.4f}",
                "yes" if net["within_tolerance"] else "**no**",
                f"{method['label_agreement']:.4f} / {method['probability_max_abs_diff']:.2g}",
                f"{reduced['label_agreement']:.4f} / {reduced['probability_max_abs_diff']:.2g}"
                f" / {'same' if reduced['same_finding'] else 'other'} finding",
                f"{_fmt(traced['full'], 0)} / {_fmt(traced['reduced'], 0)}",
            ]
        )
    tol = result["tolerances"]
    lines += [
        f"Equality checks (tolerance: logits within {tol['logit_max_abs_diff']}, labels agreeing "
        f"on at least {tol['label_agreement_min']:.1%} of pixels):",
        "",
    ]
    lines += _table(
        [
            "size",
            "ONNX vs eager: segmentation logits, max |diff|",
            "classifier logits, max |diff|",
            "segmentation labels agree",
            "within tolerance",
            "ONNX vs eager, whole method: labels agree / max |Δp|",
            "reduced vs full decode: labels agree / max |Δp| / finding",
            "Python+numpy traced peak MiB, full / reduced",
        ],
        check_rows,
    )
    if not result.get("model_trained"):
        lines += [
            "With untrained networks the segmentation answers nearly one class everywhere, so "
            "label agreement says little; the logit differences are the meaningful check.",
            "",
        ]
    compiled = result.get("torch_compile")
    if compiled:
        lines += [
            f"`torch.compile` (inductor) on the segmentation network, input "
            f"{'x'.join(map(str, compiled['input']))}: eager {compiled['eager_ms']:.0f} ms, "
            f"compiled {compiled['compiled_ms']:.0f} ms, compile and first call "
            f"{compiled['compile_and_first_call_s']:.0f} s, max |logit diff| "
            f"{compiled['logit_max_abs_diff']:.2g}; {compiled['note']}. ONNX export of both "
            f"networks took {result['onnx_export_s']} s.",
            "",
        ]
    memory = result.get("worker_memory") or []
    if memory:
        lines += [
            "Peak resident memory of a worker-like process (fresh process per row: models "
            "loaded, then the same photo twice; full-decode rows also build and write SEG, SR "
            "and overlay, reduced rows stop at the findings):",
            "",
        ]
        lines += _table(
            ["size", "decode", "networks", "models loaded, MiB", "peak, MiB", "method ms"],
            [
                [
                    m["size"],
                    m["decode"],
                    m["backend"],
                    f"{m['rss_models_loaded_mib']:.0f}",
                    f"{m['peak_rss_mib']:.0f}",
                    f"{m['method_total_ms_second_photo']:.0f}",
                ]
                for m in memory
            ],
        )
    lines += machine_section(result["machine"])
    return lines


def end_to_end_section(result: Mapping[str, Any]) -> list[str]:
    lines = ["### End to end: storescu → dermpacs → Orthanc", ""]
    if "error" in result:
        return lines + [f"Not measured: {result['error']}", ""]
    d = result["input"]
    lines += [
        f"Networks: {result['model']}. Photos: {d['columns']}x{d['rows']} camera JPEG "
        f"({d['file_bytes'] / 1e6:.1f} MB), each in its own study, one storescu association "
        "each. Latency: storescu start → job delivered (Orthanc acknowledged SEG, SR and "
        "overlay).",
        "",
    ]
    rows = []
    for run in result["runs"]:
        backlog, steady = run["backlog"], run["steady"]
        drain = (
            f"{backlog['drain_s']:.0f} s"
            if backlog["complete"]
            else f"{backlog['delivered']} of {backlog['photos']} in the "
            f"{backlog.get('budget_s', 0):.0f} s budget; ~{backlog['drain_s_extrapolated']} s "
            "extrapolated"
        )
        rows.append(
            [
                run["inference_worker_processes"],
                f"{run['startup_s']:.0f} s",
                f"{backlog['photos']}",
                drain,
                f"{backlog['photos_per_second']:.2f}",
                f"{steady['rate_per_second']:.2f}/s × {steady['photos']}",
                _fmt(steady["latency_p50_s"], 2),
                _fmt(steady["latency_p95_s"], 2),
            ]
        )
    lines += _table(
        [
            "inference worker processes",
            "start-up",
            "backlog photos",
            "drain time",
            "sustained photos/s",
            "steady arrivals",
            "p50 latency s",
            "p95 latency s",
        ],
        rows,
    )
    lines += machine_section(result["machine"])
    return lines


def gpu_section(result: Mapping[str, Any] | None) -> list[str]:
    lines = ["### GPU: batched inference", ""]
    if not result:
        return lines + [
            "Not measured in this run (no GPU on this machine). Run "
            "`python -m bench.gpu_inference --amp --out bench/results/gpu.json` on a CUDA "
            "machine; the next `python -m bench` run puts its table here.",
            "",
        ]
    lines += [
        f"Card: {result['device']}; networks: {result['model']}; "
        f"{result['gflops_per_photo']} GFLOP per photo (segmentation at "
        f"{'x'.join(map(str, result['analysis_input']))} + {result['crops_per_photo']} crops).",
        "",
    ]
    rows = []
    for r in result["results"]:
        gpu = r.get("gpu") or {}
        rows.append(
            [
                r["what"],
                r["batch"],
                r["precision"],
                f"{r['photos_per_second']:.1f}",
                _fmt(gpu.get("utilisation_mean_pct")),
                _fmt(r.get("achieved_tflops"), 2),
                _fmt(r.get("share_of_peak"), 4),
            ]
        )
    lines += _table(
        ["what", "batch", "precision", "photos/s", "GPU busy %", "TFLOP/s", "share of peak"], rows
    )
    lines += machine_section(result["machine"])
    return lines


def render(results: Mapping[str, Any]) -> str:
    """All tables of one ``python -m bench`` run as Markdown."""
    lines = [START, ""]
    mode = "short (harness check: figures are not meaningful)" if results.get("short") else "full"
    lines += [
        f"Run of {results.get('date')} ({mode}), `{results.get('command')}`, "
        f"{results.get('seconds')} s in all.",
        "",
    ]
    merged = results.get("merged_from")
    if merged:
        lines += [
            f"Parts {', '.join(merged['parts'])} are carried over from {merged['file']} (which "
            "may itself carry parts of earlier runs): each table's machine line says when and "
            "by which command it was measured.",
            "",
        ]
    parts = results.get("parts", {})
    if "receive" in parts:
        lines += receive_section(parts["receive"])
    if "inference" in parts:
        lines += inference_section(parts["inference"])
    if "end_to_end" in parts:
        lines += end_to_end_section(parts["end_to_end"])
    lines += gpu_section(parts.get("gpu"))
    lines += [END]
    return "\n".join(lines) + "\n"


def write_into(document: Path, rendered: str) -> None:
    """Replace the text between the markers of ``document`` (or append the block)."""
    text = document.read_text() if document.is_file() else ""
    if START in text and END in text:
        before = text[: text.index(START)]
        after = text[text.index(END) + len(END) :]
        text = before + rendered.rstrip("\n") + after
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + rendered
    document.write_text(text)


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))
