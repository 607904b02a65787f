"""``dermpacs process``: DICOM photos in, SEG/SR/overlay out, one JSON line per input.

The networks are small plumbing networks (tests/plumbing_models.py), not trained ones: these
tests check the command, its outputs and its errors, not the method's skill.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dermpacs.analysis import BACKGROUND, LESION
from dermpacs.cli import main
from dermpacs.config import Settings
from tests.photos import dicom_bytes, make_ct_slice, make_photo
from tests.plumbing_models import CLASSES, write_plumbing_models

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _config(tmp_path: Path, settings: Settings) -> Path:
    model = settings.model
    path = tmp_path / "dermpacs.toml"
    path.write_text(
        "[storage]\n"
        f'root = "{settings.storage.root}"\n'
        "[model]\n"
        f'segmentation_weights = "{model.segmentation_weights}"\n'
        f'classifier_weights = "{model.classifier_weights}"\n'
        'device = "cpu"\n'
        f"long_side = {model.long_side}\n"
        f"classes = {json.dumps(CLASSES)}\n"
    )
    return path


def _inputs(folder: Path) -> dict[str, tuple[Path, pydicom.Dataset]]:
    folder.mkdir(parents=True)
    made = {}
    for index, kind in enumerate(["vlp-jpeg-baseline-ybr-422", "vlp-explicit-rgb"]):
        dataset, _ = make_photo(kind, rows=120, columns=160, seed=index)
        path = folder / f"{index}-{kind}.dcm"
        path.write_bytes(dicom_bytes(dataset))
        made[kind] = (path, dataset)
    return made


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    status = main(argv)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    return status, lines


def test_process_writes_results_and_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, write_plumbing_models(tmp_path, LESION))
    inputs = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    status, lines = _run(
        ["process", str(tmp_path / "in"), "--out", str(out), "--json", "--config", str(config)],
        capsys,
    )
    assert status == 0
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    for record, (path, source) in zip(records, inputs.values(), strict=True):
        assert record["source"] == str(path)
        assert record["source_sop_instance_uid"] == source.SOPInstanceUID
        assert record["skin_fraction"] == 1.0 and record["lesion_fraction"] == 1.0
        assert record["crops"], "an all-lesion mask has qualifying windows"
        for crop in record["crops"]:
            r0, c0, r1, c1 = crop["box"]
            assert 0 <= r0 < r1 <= 120 and 0 <= c0 < c1 <= 160
        assert set(record["probabilities"]) == set(CLASSES)
        assert record["finding"] in CLASSES
        assert record["quality_flags"] == [] or "blur" in record["quality_flags"]
        assert set(record["outputs"]) == {"seg", "sr", "overlay"}
        seg = pydicom.dcmread(record["outputs"]["seg"])
        assert seg.SOPClassUID == SEG_STORAGE
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        assert (seg.Rows, seg.Columns) == (120, 160)
        for kind in ("sr", "overlay"):
            written = pydicom.dcmread(record["outputs"][kind])
            assert written.StudyInstanceUID == source.StudyInstanceUID
        assert Path(record["outputs"]["seg"]).parent == out / source.SOPInstanceUID


def test_refused_inputs_give_error_lines_and_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, write_plumbing_models(tmp_path, None))
    inputs = _inputs(tmp_path / "in")
    ct = tmp_path / "ct.dcm"
    ct.write_bytes(dicom_bytes(make_ct_slice()))
    junk = tmp_path / "notes.txt"
    junk.write_text("not DICOM")
    good = inputs["vlp-explicit-rgb"][0]
    jpeg = inputs["vlp-jpeg-baseline-ybr-422"][0]
    argv = ["process", str(ct), str(good), str(junk), str(jpeg), str(tmp_path / "missing.dcm")]
    # batches of three: refused inputs leave holes in a batch, the order stays the inputs'
    status, lines = _run(
        argv
        + ["--out", str(tmp_path / "out"), "--json", "--config", str(config), "--batch-size", "3"],
        capsys,
    )
    assert status == 1
    records = [json.loads(line) for line in lines]
    assert [r["source"] for r in records] == [
        str(ct),
        str(good),
        str(junk),
        str(jpeg),
        str(tmp_path / "missing.dcm"),
    ]
    assert "error" in records[0] and records[0]["reason"] == "not_a_photograph"
    assert "error" not in records[1] and records[1]["outputs"]
    assert "error" in records[2] and records[2]["reason"] == "unparseable"
    assert "error" not in records[3] and records[3]["outputs"]
    assert "error" in records[4] and records[4]["reason"] == "unreadable"


def test_plain_output_and_whole_photo_fallback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, write_plumbing_models(tmp_path, BACKGROUND))
    _inputs(tmp_path / "in")
    status, lines = _run(
        ["process", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--config", str(config)],
        capsys,
    )
    assert status == 0
    assert len(lines) == 2
    for line in lines:
        assert "0 crops" in line and "too_little_skin" in line and "no_qualifying_crop" in line


def test_unusable_weights_stop_before_any_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = write_plumbing_models(tmp_path, None)
    settings.model.classes = ["atopic_dermatitis", "psoriasis"]
    config = _config(tmp_path, settings)
    config.write_text(
        config.read_text().replace(json.dumps(CLASSES), '["atopic_dermatitis", "psoriasis"]')
    )
    _inputs(tmp_path / "in")
    status = main(
        ["process", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--config", str(config)]
    )
    captured = capsys.readouterr()
    assert status == 2
    assert "classes" in captured.err
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_same_photo_same_uids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, write_plumbing_models(tmp_path, None))
    inputs = _inputs(tmp_path / "in")
    path = inputs["vlp-explicit-rgb"][0]
    uids = []
    for run in range(2):
        status, lines = _run(
            [
                "process",
                str(path),
                "--out",
                str(tmp_path / f"out{run}"),
                "--json",
                "--config",
                str(config),
            ],
            capsys,
        )
        assert status == 0
        record = json.loads(lines[0])
        uids.append({k: pydicom.dcmread(v).SOPInstanceUID for k, v in record["outputs"].items()})
        labels = pydicom.dcmread(record["outputs"]["seg"]).pixel_array
        assert np.asarray(labels).size > 0
    assert uids[0] == uids[1]
