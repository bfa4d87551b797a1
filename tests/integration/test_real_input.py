"""Real hospital input end to end: series compressed by real encoders and a non-brain phantom, sent by dcmtk
``storescu`` to ``uad-node serve``, results in a real Orthanc.

One study holds the same Colin27 T1 uncompressed and in every transfer syntax of ``tests.encoders`` (each its
own series); every one must be analysed, the lossless ones to exactly the uncompressed series' SEG, the lossy
ones to nearly it. A phantom with a T1 header, in its own study, must give exactly one NOT SCREENED Secondary
Capture in the PACS and no SEG. The model is the fast untrained one (``tests.tiny_model``): every stage runs
for real and the comparison is exact, though its findings mean nothing.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from node.jobs.states import JobState
from node.jobs.store import JobRecord
from tests import brains
from tests.dicom_series import AXIAL, centred_grid, resample, write_mr_series
from tests.encoders import ENCODINGS, encode, storescu_profile
from tests.integration.test_node_jobs import jobs_of
from tests.peers import NodeProcess, Orthanc, free_port, node_config, require_tool, running_orthanc
from tests.qc_corpus import qc_cases, write_case
from tests.tiny_model import write_fast_checkpoint

pytestmark = [pytest.mark.peers, pytest.mark.timeout(900)]

WAIT_S = 600.0  # eleven analyses on a loaded 2-core machine
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}
# Lossy encodings: Dice of their SEG with the uncompressed series' SEG, at least. Measured 2026-12-07 with the
# fast test model (scores near its threshold, so small intensity changes move voxels across it): 12-bit JPEG
# 0.920, 8-bit JPEG 0.894, JPEG-LS near-lossless 0.995, JPEG 2000 at ratio 10 0.762.
LOSSY_MIN_DICE = {
    "jpeg-extended-12bit": 0.85,
    "jpeg-baseline-8bit": 0.8,
    "jpeg-ls-near-lossless": 0.95,
    "j2k-lossy": 0.65,
}


@dataclass(frozen=True)
class Outcome:
    """What one node run made of the study and the phantom."""

    jobs: dict[str, JobRecord]  # by series description
    results: dict[str, dict[str, list[str]]]  # study UID -> modality -> series descriptions of the objects
    log: str


def storescu(*args: str) -> None:
    run = subprocess.run(
        [require_tool("storescu"), "-aet", "SCANNER1", "-aec", "UADNODE", *args],
        capture_output=True,
        text=True,
        env=NODELAY_ENV,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def wait_until_finished(data_dir: Path, node: NodeProcess, count: int) -> list[JobRecord]:
    deadline, jobs = time.monotonic() + WAIT_S, []
    while time.monotonic() < deadline:
        if (data_dir / "uad-node.sqlite").exists():
            jobs = jobs_of(data_dir)
            if len(jobs) >= count and all(job.state.finished for job in jobs):
                return jobs
        assert node.process is not None and node.process.poll() is None, node.log()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"not finished after {WAIT_S} s: {[(j.id, j.state, j.reason) for j in jobs]}")


def objects_in(orthanc: Orthanc) -> dict[str, dict[str, list[str]]]:
    found: dict[str, dict[str, list[str]]] = {}
    for study in orthanc.get("/studies?expand"):
        study_uid = study["MainDicomTags"]["StudyInstanceUID"]
        for series in orthanc.get(f"/studies/{study['ID']}/series"):
            tags = series["MainDicomTags"]
            count = len(series["Instances"])
            found.setdefault(study_uid, {}).setdefault(tags["Modality"], []).extend(
                [tags.get("SeriesDescription", "")] * count
            )
    return found


def keep_original(paths: list[Path]) -> None:
    """dcmcjpeg marks lossy-compressed images DERIVED (Lossy Image Compression 01 already says it), which the
    default ``[selection]`` skips as a derived series; PACS that lossy-compress originals keep ORIGINAL. The
    header is edited with dcmtk's dcmodify, the compressed pixel data stay as the encoder wrote them."""
    dcmodify = require_tool("dcmodify")
    run = subprocess.run(
        [dcmodify, "-nb", "-m", "(0008,0008)=ORIGINAL\\PRIMARY\\M\\ND", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    folder = tmp_path_factory.mktemp("real-input")
    checkpoint = write_fast_checkpoint(folder / "fast.pt")
    colin = brains.colin27(skull=True)
    volume = resample(colin, centred_grid(colin, AXIAL, (1.5, 1.5, 3.5), (120, 140, 36)))
    study_uid = generate_uid()
    write_mr_series(volume, folder / "plain", description="T1 MPRAGE AX plain", study_uid=study_uid)
    for number, encoding in enumerate(ENCODINGS, start=2):
        raw = write_mr_series(
            volume,
            folder / "raw" / encoding.name,
            description=f"T1 MPRAGE AX {encoding.name}",
            study_uid=study_uid,
            series_number=number,
        )
        encoded = encode(raw, folder / "encoded" / encoding.name, encoding)
        if encoding.max_error is not None:
            keep_original(encoded)
    [phantom] = [case for case in qc_cases() if case.name == "phantom"]
    write_case(phantom, folder / "phantom")
    profile = storescu_profile(folder / "storescu.cfg", [encoding.transfer_syntax for encoding in ENCODINGS])

    with ExitStack() as stack:
        orthanc = stack.enter_context(running_orthanc(folder / "orthanc", {"node": "UADNODE", "scanner": "SCANNER1"}))
        port = free_port()
        config = node_config(
            folder,
            port,
            extra=f"""
[selection]
models = {{ T1 = "{checkpoint}" }}

[completion]
series_quiet_s = 1

[jobs]
threads = 1
poll_interval_s = 0.2
export_first_delay_s = 0.5
export_max_delay_s = 2

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.dicom_port}
""",
        )
        node = NodeProcess(config, folder / "data", port, "UADNODE").start()
        stack.callback(node.stop)
        storescu("+sd", "+r", "127.0.0.1", str(port), str(folder / "plain"), str(folder / "phantom"))
        storescu("-xf", str(profile), "Codecs", "+sd", "+r", "127.0.0.1", str(port), str(folder / "encoded"))
        jobs = wait_until_finished(folder / "data", node, 2 + len(ENCODINGS))
        by_description = {}
        for job in jobs:
            path = next(Path(p) for p in _instance_paths(folder / "data", job))
            by_description[str(pydicom.dcmread(path, stop_before_pixels=True).SeriesDescription)] = job
        yield Outcome(jobs=by_description, results=objects_in(orthanc), log=node.log())


def _instance_paths(data_dir: Path, job: JobRecord) -> list[Path]:
    return sorted((data_dir / "studies" / job.study_uid / job.series_uid).glob("*.dcm"))


def seg_mask(job: JobRecord) -> np.ndarray:
    return pydicom.dcmread(Path(job.results_dir) / "seg.dcm").pixel_array.astype(bool)


def test_every_compressed_series_is_analysed_and_its_seg_reaches_the_pacs(outcome: Outcome) -> None:
    plain = outcome.jobs["T1 MPRAGE AX plain"]
    assert plain.state is JobState.DONE, plain.reason
    for encoding in ENCODINGS:
        job = outcome.jobs[f"T1 MPRAGE AX {encoding.name}"]
        assert job.state is JobState.DONE, f"{encoding.name}: {job.reason}"
        assert job.report["analysed"] is True
    descriptions = outcome.results[plain.study_uid]["SEG"]
    assert len(descriptions) == 1 + len(ENCODINGS)  # one SEG per analysed series, the JPEG Lossless ones included


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.name)
def test_the_seg_of_a_compressed_series_equals_the_uncompressed_ones(outcome: Outcome, encoding: object) -> None:
    """Lossless: identical findings, voxel for voxel. Lossy: nearly the same segmentation."""
    plain = outcome.jobs["T1 MPRAGE AX plain"]
    job = outcome.jobs[f"T1 MPRAGE AX {encoding.name}"]  # type: ignore[attr-defined]
    expected, found = seg_mask(plain), seg_mask(job)
    assert found.shape == expected.shape
    figures = ("anomaly_volume_ml", "components", "max_score")
    if encoding.max_error is None:  # type: ignore[attr-defined]
        assert np.array_equal(found, expected)
        assert {k: job.report[k] for k in figures} == {k: plain.report[k] for k in figures}
    else:
        dice = 2 * np.count_nonzero(found & expected) / max(np.count_nonzero(found) + np.count_nonzero(expected), 1)
        print(f"{encoding.name}: SEG Dice with the uncompressed series {dice:.3f}")  # type: ignore[attr-defined]
        assert dice >= LOSSY_MIN_DICE[encoding.name]  # type: ignore[attr-defined]


def test_a_phantom_gets_exactly_one_not_screened_notice_and_no_seg(outcome: Outcome) -> None:
    study = outcome.jobs["T1 MPRAGE AX plain"].study_uid
    [job] = [job for job in outcome.jobs.values() if job.study_uid != study]
    assert job.state is JobState.FAILED
    assert job.reason.startswith("not screened: quality gate: registration to the atlas failed")
    assert job.reason.endswith("NOT SCREENED notice delivered to pacs (1 objects)")
    assert job.report["analysed"] is False and job.report["quality"]["registration_similarity"] < 0.4
    assert job.inferring_at is None  # the model never saw it
    in_pacs = outcome.results[job.study_uid]  # the PACS has only what the node sent: the notice
    assert set(in_pacs) == {"OT"}, in_pacs  # no SEG, no SR
    [notice] = in_pacs["OT"]
    assert notice.startswith("NOT SCREENED")
