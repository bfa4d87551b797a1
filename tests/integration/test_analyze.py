"""``uad-node analyze`` as a researcher runs it: a study folder in; SEG, overlays, summary and report out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests import brains
from tests.dicom_series import AXIAL, SAGITTAL, centred_grid, resample, write_mr_series
from tests.peers import validate_with_dciodvfy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", "analyze", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A two-series study of Colin27: an axial T1 to analyse and a 3-slice localizer to skip."""
    colin = brains.colin27(skull=True)
    folder = tmp_path_factory.mktemp("study")
    study_uid = generate_uid()
    t1 = write_mr_series(
        resample(colin, centred_grid(colin, AXIAL, (1.2, 1.2, 2.0), (150, 176, 75))),
        folder / "t1",
        description="T1 MPRAGE AX",
        study_uid=study_uid,
    )
    localizer = write_mr_series(
        resample(colin, centred_grid(colin, SAGITTAL, (2.0, 2.0, 10.0), (96, 96, 3))),
        folder / "localizer",
        description="localizer",
        study_uid=study_uid,
        series_number=2,
    )
    (folder / "notes.txt").write_text("not DICOM; ignored")
    return folder, str(pydicom.dcmread(t1[0]).SeriesInstanceUID), str(pydicom.dcmread(localizer[0]).SeriesInstanceUID)


def test_analyze_writes_seg_overlays_summary_and_report(study: tuple[Path, str, str], tmp_path: Path) -> None:
    folder, t1_uid, localizer_uid = study
    out = tmp_path / "out"
    run = analyze(str(folder), "--out", str(out))
    assert run.returncode == 0, run.stderr

    report = {entry["series_uid"]: entry for entry in json.loads((out / "report.json").read_text())["series"]}
    assert set(report) == {t1_uid, localizer_uid}
    skipped = report[localizer_uid]
    assert skipped["selected"] is False and skipped["model"] is None and "localizer" in skipped["reason"].lower()
    analysed = report[t1_uid]
    assert analysed["selected"] is True and analysed["model"].startswith("cDDPM default")
    assert analysed["threshold"] > 0 and analysed["anomaly_volume_ml"] >= 0 and analysed["components"] >= 0
    assert set(analysed["timings_s"]) == {"volume", "preprocessing", "inference", "objects"}

    results = out / t1_uid
    seg = hd.seg.segread(results / "seg.dcm")
    assert seg.StudyInstanceUID == pydicom.dcmread(next((folder / "t1").iterdir())).StudyInstanceUID
    referenced = {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence}
    assert referenced == {t1_uid} and seg.SeriesInstanceUID != t1_uid
    overlays = sorted((results / "overlays").glob("*.dcm"))
    assert overlays[0].name == "000-summary.dcm"
    assert (results / "summary.png").read_bytes().startswith(PNG_SIGNATURE)
    for path in (results / "seg.dcm", overlays[0]):
        validate_with_dciodvfy(path)


def test_analyze_refuses_unusable_input_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for folder, reason in ((tmp_path / "empty", "no DICOM images found"), (tmp_path / "missing", "is not a folder")):
        run = analyze(str(folder), "--out", str(tmp_path / "out"))
        assert run.returncode == 2
        assert run.stderr.strip().count("\n") == 0 and reason in run.stderr
