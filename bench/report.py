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

RESULT_STAGES = ("build_segmentation", "build_report", "build_overlay")
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


def _receiver_label(name: str) -> str:
    """``dermpacs-2p`` -> ``dermpacs, 2 processes``; other names as they are."""
    if name.startswith("dermpacs-") and name.endswith("p"):
        count = name[len("dermpacs-") : -1]
        return f"dermpacs, {count} process{'es' if count != '1' else ''}"
    return name


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
    dermpacs_names = [n for n in result["rows"][0]["receivers"] if n.startswith("dermpacs")]
    rows = []
    for row in result["rows"]:
        cells = []
        for name in (*dermpacs_names, "storescp", "orthanc"):
            r = row["receivers"][name]
            cells.append(
                f"{r['photos_per_second_median']:.1f} "
                f"[{r['photos_per_second_min']:.0f}–{r['photos_per_second_max']:.0f}]"
            )
        best = row.get("best_dermpacs", "dermpacs")
        rows.append(
            [
                row["label"],
                *cells,
                f"{row['dermpacs_vs_storescp']:.2f}",
                f"{row['dermpacs_vs_orthanc']:.2f}",
                ("met" if row["meets_target"] else "**missed**")
                + (f" ({_receiver_label(best)})" if len(dermpacs_names) > 1 else ""),
            ]
        )
    best_words = "best dermpacs" if len(dermpacs_names) > 1 else "dermpacs"
    lines += _table(
        [
            "burst",
            *(_receiver_label(n) for n in dermpacs_names),
            "storescp (tuned)",
            "Orthanc",
            f"{best_words} / storescp",
            f"{best_words} / Orthanc",
            "target (>Orthanc, ≥0.5×storescp)",
        ],
        rows,
    )
    lines += _receive_cpu_table(result, dermpacs_names)
    inputs_text = "; ".join(
        f"{name}: {d['columns']}x{d['rows']}, {d['transfer_syntax']}, "
        f"{d['file_bytes'] / 1e6:.2f} MB"
        for name, d in result.get("inputs", {}).items()
    )
    lines += [f"Inputs: {inputs_text}.", ""]
    lines += ["Receivers: " + "; ".join(f"{k}: {v}" for k, v in result["receivers"].items()), ""]
    lines += machine_section(result["machine"])
    return lines


def _receive_cpu_table(result: Mapping[str, Any], dermpacs_names: Sequence[str]) -> list[str]:
    """CPU milliseconds per photo of each receiver (dermpacs with its broker), and of the
    storescu senders; empty for results measured before the receive part counted CPU."""
    names = (*dermpacs_names, "storescp", "orthanc")
    first = result["rows"][0]["receivers"][names[0]]
    if "receiver_cpu_ms_per_photo" not in first:
        return []
    rows = []
    for row in result["rows"]:
        cells = []
        for name in names:
            r = row["receivers"][name]
            cell = f"{r['receiver_cpu_ms_per_photo']:.2f}"
            if name.startswith("dermpacs"):
                cell += f" + {r['broker_cpu_ms_per_photo']:.2f}"
            cells.append(f"{cell} ({r['sender_cpu_ms_per_photo']:.2f})")
        rows.append([row["label"], *cells])
    return [
        "CPU milliseconds per photo, medians of the same bursts: the receiver's processes "
        "(dermpacs: + Redis, its broker), and in brackets the storescu senders'. Two cores "
        "serve all of them: where the sum nears 2 × 1000 / (photos/s), the burst is bound by "
        "the CPU.",
        "",
        *_table(["burst", *(_receiver_label(n) for n in names)], rows),
    ]


def inference_section(result: Mapping[str, Any]) -> list[str]:
    lines = ["### Inference: milliseconds per photo, by stage", ""]
    if "error" in result:
        return lines + [f"Not measured: {result['error']}", ""]
    if result.get("format") != 2:
        return lines + [
            "Measured by an earlier version of `bench/inference.py` (variants eager/ONNX "
            "Runtime x full/reduced decode); run `python -m bench --only inference` again "
            "for a table of this version.",
            "",
        ]
    trained = "" if result.get("model_trained") else " **(untrained: timings only)**"
    variants = "; ".join(f"**{name}**: {what}" for name, what in result["variants"].items())
    lines += [
        f"Networks: {result['model']}{trained}. Analysis long side {result['analysis_long_side']} "
        f"px, crops {result['crop_size']} px. Camera JPEG (img2dcm) photos, one at a time, "
        "through the worker's steps (`dermpacs.processing.build_job_results`), the variants "
        f"taking turns; median of {result['repeats']} runs after a warm-up (fastest run in "
        f"brackets). Variants: {variants}. 'method' is parse + decode + the Analyser "
        "(everything up to the findings); 'worker' adds SEG, SR and overlay and writing them "
        "with fsync.",
        "",
    ]
    header = [
        "size",
        "variant",
        "decoded (preview)",
        *[label for key, label in STAGES],
        "method total",
        "SEG",
        "SR",
        "overlay",
        "write + fsync",
        "worker total",
    ]
    rows = []
    for row in result["rows"]:
        ms, fast = row["ms"], row["ms_min"]
        decoded = "x".join(str(v) for v in reversed(row["decoded_shape"]))
        if row.get("preview_shape"):
            decoded += f" ({'x'.join(str(v) for v in reversed(row['preview_shape']))})"
        rows.append(
            [
                f"{row['size']} ({row['file_bytes'] / 1e6:.1f} MB)",
                row["variant"],
                decoded,
                *[f"{ms.get(key, 0):.0f}" for key, _ in STAGES],
                f"**{ms['method_total']:.0f}** ({fast['method_total']:.0f})",
                *[f"{ms.get(key, 0):.0f}" for key in RESULT_STAGES],
                f"{ms.get('write_fsync', 0):.0f}",
                f"**{ms['worker_total']:.0f}** ({fast['worker_total']:.0f})",
            ]
        )
    lines += _table(header, rows)
    target = result["target"]
    met = target["worker_ms_median"] < target["seconds"] * 1000
    fastest_met = target["worker_ms_min"] < target["seconds"] * 1000
    lines += [
        f"Target, whole method < {target['seconds']} s per {target['size']} photo: old path "
        f"(eager PyTorch, full decode) {target['baseline_ms_median']:.0f} ms median "
        f"({target['baseline_ms_min']:.0f} fastest); the worker (ONNX Runtime, full decode) "
        f"{target['worker_ms_median']:.0f} ms median ({target['worker_ms_min']:.0f} fastest): "
        f"{'met' if met else '**missed**'} on the median, "
        f"{'met' if fastest_met else '**missed**'} on the fastest run. ONNX export at first "
        f"use {result['onnx_export_first_use_s']} s, later loads from the cache "
        f"{result['onnx_load_from_cache_s']} s.",
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
    batching = result.get("batching")
    if batching:
        lines += [
            f"Batching on this CPU (worker variant, {batching['photos']} {batching['size']} "
            "photos, taking turns), ms per photo fastest / median: one `analyse_batch` of 4 "
            f"{batching['batch_4']['min_ms']:.0f} / {batching['batch_4']['median_ms']:.0f}, "
            f"four `analyse` calls {batching['batch_1']['min_ms']:.0f} / "
            f"{batching['batch_1']['median_ms']:.0f}.",
            "",
        ]
    check_rows = []
    for size, check in result["checks"].items():
        net = check["onnxruntime_vs_eager_networks"]
        onnx, worker = check["onnx_vs_old"], check["worker_vs_old"]
        check_rows.append(
            [
                size,
                f"{net['segmentation_logit_max_abs_diff']:.2g} (logit std "
                f"{net['segmentation_logit_std']:.2g}) / "
                f"{net['classifier_logit_max_abs_diff']:.2g}",
                *[
                    f"{c['label_agreement']:.4f} / {c['probability_max_abs_diff']:.2g} / "
                    f"{'same' if c['same_finding'] else 'other'} finding: "
                    f"{'yes' if c['within_tolerance'] else '**no**'}"
                    for c in (onnx, worker)
                ],
            ]
        )
    tol = result["tolerances"]
    lines += [
        "Equality against the old path (tolerances, docs/model-card.md: ONNX Runtime labels "
        f"agreeing on at least {tol['onnx_label_agreement_min']:.2%} of pixels and "
        f"probabilities within {tol['onnx_probability_max_abs_diff']:.0e}; the worker with its "
        f"preview {tol['preview_label_agreement_min']:.1%} and "
        f"{tol['preview_probability_max_abs_diff']}; the same finding):",
        "",
    ]
    lines += _table(
        [
            "size",
            "networks: segmentation / classifier logits, largest difference",
            "onnx vs old: labels agree / largest Δp / finding: within",
            "worker vs old: labels agree / largest Δp / finding: within",
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
            f"{compiled['logit_max_abs_diff']:.2g}; {compiled['note']}.",
            "",
        ]
    memory = result.get("worker_memory") or []
    if memory:
        lines += [
            "Peak resident memory of a worker-like process (fresh process per row: models "
            "loaded, ONNX files from the cache, then the same photo twice through the whole "
            "path, results written):",
            "",
        ]
        lines += _table(
            ["size", "variant", "models loaded, MiB", "peak, MiB", "worker ms (2nd photo)"],
            [
                [
                    m["size"],
                    m["variant"],
                    f"{m['rss_models_loaded_mib']:.0f}",
                    f"{m['peak_rss_mib']:.0f}",
                    f"{m['worker_total_ms_second_photo']:.0f}",
                ]
                for m in memory
            ],
        )
    lines += machine_section(result["machine"])
    return lines


def end_to_end_section(result: Mapping[str, Any]) -> list[str]:
    if "error" in result:
        return ["### End to end: storescu → dermpacs → Orthanc", ""] + [
            f"Not measured: {result['error']}",
            "",
        ]
    d = result["input"]
    megapixels = d["columns"] * d["rows"] / 1e6
    lines = [f"### End to end ({megapixels:.0f} MP): storescu → dermpacs → Orthanc", ""]
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
    for name in ("end_to_end_1mp", "end_to_end_4mp", "end_to_end"):
        if name in parts:
            lines += end_to_end_section(parts[name])
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
