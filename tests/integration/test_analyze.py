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

from node.config import Destination, NodeConfig
from node.db import open_database
from node.sender import Sender
from tests import brains
from tests.dicom_series import AXIAL, SAGITTAL, centred_grid, resample, write_mr_series
from tests.peers import running_orthanc, validate_with_dciodvfy
from tests.qc_corpus import qc_cases, write_case

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


@pytest.fixture(scope="module")
def analysed(study: tuple[Path, str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analysed") / "out"
    run = analyze(str(study[0]), "--out", str(out))
    assert run.returncode == 0, run.stderr
    return out


def test_analyze_writes_seg_overlays_summary_and_report(study: tuple[Path, str, str], analysed: Path) -> None:
    folder, t1_uid, localizer_uid = study
    out = analysed

    report = {entry["series_uid"]: entry for entry in json.loads((out / "report.json").read_text())["series"]}
    assert set(report) == {t1_uid, localizer_uid}
    skipped = report[localizer_uid]
    assert skipped["selected"] is False and skipped["model"] is None and "localizer" in skipped["reason"].lower()
    assert skipped["analysed"] is False and skipped["quality"] is None
    analysed = report[t1_uid]
    assert analysed["selected"] is True and analysed["model"].startswith("cDDPM default")
    assert analysed["analysed"] is True and analysed["quality"]["registration_similarity"] > 0.4
    assert analysed["threshold"] > 0 and analysed["anomaly_volume_ml"] >= 0 and analysed["components"] >= 0
    assert set(analysed["timings_s"]) == {"volume", "preprocessing", "quality", "inference", "objects"}
    assert not (out / localizer_uid).exists()  # skipped by the rules: no notice

    results = out / t1_uid
    seg = hd.seg.segread(results / "seg.dcm")
    assert seg.StudyInstanceUID == pydicom.dcmread(next((folder / "t1").iterdir())).StudyInstanceUID
    referenced = {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence}
    assert referenced == {t1_uid} and seg.SeriesInstanceUID != t1_uid
    overlays = sorted((results / "overlays").glob("*.dcm"))
    assert overlays[0].name == "000-summary.dcm"
    assert (results / "summary.png").read_bytes().startswith(PNG_SIGNATURE)
    sr = hd.sr.srread(results / "sr.dcm")
    [group] = sr.content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert group.get_measurements()[0].value == pytest.approx(analysed["anomaly_volume_ml"], abs=1e-3)
    for path in (results / "seg.dcm", results / "sr.dcm", overlays[0]):
        validate_with_dciodvfy(path)


def test_analyze_does_not_screen_a_phantom_and_says_why(tmp_path: Path) -> None:
    """A non-brain phantom with a T1 header: no SEG, a NOT SCREENED notice, the gate's values in the report,
    and the reason printed."""
    [phantom] = [case for case in qc_cases() if case.name == "phantom"]
    folder = write_case(phantom, tmp_path / "in")
    run = analyze(str(folder), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    [entry] = json.loads((tmp_path / "out" / "report.json").read_text())["series"]
    assert (entry["selected"], entry["analysed"], entry["anomaly_volume_ml"]) == (True, False, None)
    assert entry["reason"].startswith("quality gate: registration to the atlas failed")
    assert entry["quality"]["registration_similarity"] < 0.4 and entry["quality"]["anomaly_fraction"] is None
    assert f"{entry['series_uid']}: NOT SCREENED: {entry['reason']}" in run.stdout
    results = tmp_path / "out" / entry["series_uid"]
    assert sorted(p.name for p in results.iterdir()) == ["notice.dcm", "notice.png"]
    notice = pydicom.dcmread(results / "notice.dcm")
    assert notice.SeriesDescription.startswith("NOT SCREENED") and entry["reason"] in notice.ImageComments
    validate_with_dciodvfy(results / "notice.dcm")


def test_analyze_refuses_unusable_input_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for folder, reason in ((tmp_path / "empty", "no DICOM images found"), (tmp_path / "missing", "is not a folder")):
        run = analyze(str(folder), "--out", str(tmp_path / "out"))
        assert run.returncode == 2
        assert run.stderr.strip().count("\n") == 0 and reason in run.stderr


def test_orthanc_shows_the_results_in_the_source_study(
    study: tuple[Path, str, str], analysed: Path, tmp_path: Path
) -> None:
    """The source series and then its results go to a real Orthanc through the node's sender."""
    folder, t1_uid, _ = study
    results = analysed / t1_uid
    results_files = [results / "seg.dcm", results / "sr.dcm", *sorted((results / "overlays").glob("*.dcm"))]
    files = sorted((folder / "t1").glob("*.dcm")) + results_files
    config = NodeConfig.model_validate({"node": {"ae_title": "UADNODE"}})
    db = open_database(f"sqlite:///{tmp_path / 'node.sqlite'}")
    try:
        with running_orthanc(tmp_path / "orthanc", {"uadnode": "UADNODE"}) as pacs:
            pacs_destination = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port)
            result = Sender(config, db).send_once(pacs_destination, files, t1_uid)
            assert (result.outcome, result.delivered) == ("delivered", len(files)), result
            [study_id] = pacs.get("/studies")
            series = [pacs.get(f"/series/{s}")["MainDicomTags"] for s in pacs.get(f"/studies/{study_id}")["Series"]]
    finally:
        db.close()
    modalities = sorted(tags["Modality"] for tags in series)
    assert modalities == ["MR", "OT", "SEG", "SR"]
    assert t1_uid in {tags["SeriesInstanceUID"] for tags in series}
