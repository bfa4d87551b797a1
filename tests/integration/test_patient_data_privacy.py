"""No patient data in logs or audit events: a whole study with a known patient name and ID goes through
``uad-node serve`` (C-STORE, completion, analysis with the tiny model, export to a real Orthanc), then serve's
log (stderr, at DEBUG) and every ``events`` row are searched for the name and the ID.

With ``logging.log_patient_data = true`` the log carries what the key promises (the patient ID of each stored
instance, ``node.receiver.audit.report_stored``) and the events still carry none: the test fails both ways.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.jobs.states import JobState
from tests import brains
from tests.dicom_series import AXIAL, centred_grid, resample, write_mr_series
from tests.integration import test_node_jobs as jobs
from tests.peers import NodeProcess, Orthanc, free_port

pytestmark = [pytest.mark.peers, pytest.mark.timeout(900)]

PATIENT_NAME = "PRIVACY^TESTPATIENT"
PATIENT_ID = "PID-ZX81-7734"
# Searched case-insensitively: the name's parts, the ID and its alphanumeric core in any spelling. The ID's
# bare digit groups ("81", "7734") are not searched alone: random UIDs and timings contain them by chance.
NEEDLES = ("PRIVACY", "TESTPATIENT", PATIENT_ID, "ZX81-7734", "ZX817734", "ZX81")

# The fixtures of the job tests: the tiny checkpoint, a real Orthanc, serve as a subprocess stopped at teardown.
checkpoint = jobs.checkpoint
orthanc = jobs.orthanc
start_node = jobs.start_node


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A 40-slice T1 of Colin27 for the patient above: (folder, study UID, series UID)."""
    folder = tmp_path_factory.mktemp("privacy-study")
    colin = brains.colin27(skull=True)
    study_uid = generate_uid()
    paths = write_mr_series(
        resample(colin, centred_grid(colin, AXIAL, (1.5, 1.5, 3.5), (120, 140, 40))),
        folder / "t1",
        description="T1 MPRAGE AX",
        study_uid=study_uid,
        attributes={"PatientName": PATIENT_NAME, "PatientID": PATIENT_ID},
    )
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert (str(header.PatientName), header.PatientID) == (PATIENT_NAME, PATIENT_ID)
    return folder, study_uid, str(header.SeriesInstanceUID)


def wait_for_job(node: NodeProcess, wait_s: float = 600.0) -> list:
    """``test_node_jobs.wait_for`` with a longer bound: this suite shares two cores with whatever else runs."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if (node.data_dir / "uad-node.sqlite").exists() and jobs.finished(1)(found_jobs := jobs.jobs_of(node.data_dir)):
            return found_jobs
        assert node.process is not None and node.process.poll() is None, node.log()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"the T1 was not analysed and exported within {wait_s:g} s\n{node.log()[-3000:]}")


def found(text: str) -> list[str]:
    upper = text.upper()
    return [needle for needle in NEEDLES if needle.upper() in upper]


def event_rows(data_dir: Path) -> list[tuple]:
    with closing(sqlite3.connect(data_dir / "uad-node.sqlite")) as db:
        return db.execute("SELECT * FROM events ORDER BY id").fetchall()


@pytest.mark.parametrize("log_patient_data", [False, True], ids=["default", "log_patient_data"])
def test_no_patient_name_or_id_in_logs_or_events(
    tmp_path: Path,
    study: tuple[Path, str, str],
    checkpoint: Path,
    orthanc: Orthanc,
    start_node: Callable[[Path], NodeProcess],
    log_patient_data: bool,
) -> None:
    folder, study_uid, series_uid = study
    config = jobs.config_for(tmp_path, free_port(), checkpoint, orthanc.dicom_port)
    text = config.read_text()
    assert "log_patient_data = false" in text and 'level = "DEBUG"' in text  # the most talkative log
    config.write_text(text.replace("log_patient_data = false", f"log_patient_data = {str(log_patient_data).lower()}"))
    node = start_node(config)
    jobs.sent(jobs.send(folder, node.port))
    [job] = wait_for_job(node)
    assert job.state is JobState.DONE and job.series_uid == series_uid, job
    # The results reached the PACS, with the patient: the data really went through every stage.
    assert "SEG" in jobs.results_in_orthanc(orthanc, study_uid)
    patients = orthanc.get("/patients?expand")
    assert [p["MainDicomTags"]["PatientID"] for p in patients] == [PATIENT_ID]  # type: ignore[index]
    assert node.stop() == 0  # SIGTERM: the log is complete

    log = node.log()
    rows = event_rows(node.data_dir)
    kinds = {row[2] for row in rows}
    assert {"association_accepted", "association_ended"} <= kinds, kinds  # the audit trail is there to search
    assert "association ended with SCANNER1@127.0.0.1: released: 40 stored" in log
    assert found(" ".join(str(value) for row in rows for value in row)) == []
    if log_patient_data:
        assert found(log) == [PATIENT_ID, "ZX81-7734", "ZX81"]  # the ID of each stored instance, as promised
        assert log.count(f"patient {PATIENT_ID!r}") == 40
    else:
        leaks = [line for line in log.splitlines() if found(line)]
        assert leaks == [], "\n".join(leaks[:20])
