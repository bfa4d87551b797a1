"""The QC corpus writes every case as a series the node reads back as written and classifies as its label."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from node.demo.series_writer import AXIAL, SAGITTAL, SYNTHETIC_PATIENT_ID
from node.selection.config import SelectionSection
from node.selection.contrast import Contrast
from node.selection.selector import select_series
from node.selection.series import group_by_series, read_headers
from node.volume import series_to_volume
from tests.dicom_series import rotated
from tests.qc_corpus import QcCase, case_volume, qc_cases, write_case

POSITIVES = {
    "mni152",
    "itk-head",
    "colin27",
    "colin27-oblique15",
    "colin27-sagittal3d",
    "colin27-axial5mm",
    "colin27-bias",
    "colin27-lowsnr",
    "colin27-512",
    "colin27-t2like-as-t2",
    "colin27-flairlike-as-flair",
}
NEGATIVES = {"phantom", "noise", "mirrored-si", "rows-flipped", "partial-slab", "mid-slab", "t2like-as-t1"}
ITK_HEAD_DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0)  # coronal, as the NIfTI header has it
CLINICAL = ((256, 256, 150), (0.9375, 0.9375, 1.2), AXIAL)
T2_LIKE = ((256, 256, 60), (0.9375, 0.9375, 3.0), AXIAL)
# name -> (size, spacing, direction) the series must read back with.
GEOMETRY: dict[str, tuple[tuple[int, int, int], tuple[float, float, float], tuple[float, ...]]] = {
    "mni152": ((197, 233, 189), (1.0, 1.0, 1.0), AXIAL),
    "itk-head": ((128, 128, 62), (2.0, 2.0, 3.0), ITK_HEAD_DIRECTION),
    "colin27": CLINICAL,
    "colin27-oblique15": ((256, 256, 160), (0.9375, 0.9375, 1.2), rotated(AXIAL, 0, 15.0)),
    "colin27-sagittal3d": ((256, 256, 160), (1.0, 1.0, 1.0), SAGITTAL),
    "colin27-axial5mm": ((256, 256, 36), (0.9, 0.9, 5.0), AXIAL),
    "colin27-bias": CLINICAL,
    "colin27-lowsnr": CLINICAL,
    "colin27-512": ((512, 512, 45), (0.45, 0.45, 4.0), AXIAL),
    "colin27-t2like-as-t2": T2_LIKE,
    "colin27-flairlike-as-flair": T2_LIKE,
    "phantom": ((256, 256, 50), (0.9375, 0.9375, 3.0), AXIAL),
    "noise": ((256, 256, 40), (0.9375, 0.9375, 4.0), AXIAL),
    "mirrored-si": CLINICAL,
    "rows-flipped": CLINICAL,
    "partial-slab": ((256, 256, 24), (0.9375, 0.9375, 1.2), AXIAL),
    "mid-slab": ((256, 256, 24), (0.9375, 0.9375, 1.2), AXIAL),
    "t2like-as-t1": T2_LIKE,
}
SUBSAMPLE = (slice(None, None, 3), slice(None, None, 7), slice(None, None, 7))  # enough voxels to catch a flip
TOLERANCE_MM = 1e-4


@dataclass(frozen=True)
class Written:
    """A written case: its files and what ``case_volume`` said was written (geometry and a voxel sample)."""

    case: QcCase
    paths: list[Path]
    origin: tuple[float, ...]
    sample: np.ndarray
    quantum: float  # the writer's worst rescale error, twice over


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Written]:
    """Every case written once (the corpus takes ~10 s to write); volumes are not kept, only samples."""
    root = tmp_path_factory.mktemp("qc-corpus")
    out = {}
    for case in qc_cases():
        folder = write_case(case, root)
        volume = case_volume(case)
        voxels = sitk.GetArrayViewFromImage(volume)
        out[case.name] = Written(
            case,
            sorted(folder.iterdir()),
            volume.GetOrigin(),
            np.array(voxels[SUBSAMPLE]),
            float(voxels.max() - voxels.min()) / 60000,
        )
    return out


def test_corpus_holds_the_positives_and_negatives_the_gate_is_calibrated_on() -> None:
    cases = qc_cases()
    assert len({case.name for case in cases}) == len(cases)
    assert {case.name for case in cases if case.expected == "pass"} == POSITIVES
    assert {case.name for case in cases if case.expected == "fail"} == NEGATIVES
    labels = {case.name: case.contrast for case in cases}
    assert (labels["colin27-t2like-as-t2"], labels["colin27-flairlike-as-flair"], labels["t2like-as-t1"]) == (
        "T2",
        "FLAIR",
        "T1",
    )
    assert all(case.why for case in cases)


@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_case_reads_back_with_its_geometry_and_voxels(written: dict[str, Written], name: str) -> None:
    """What the node reads is the case's volume: the stated geometry, and the voxels ``case_volume`` gives."""
    case = written[name]
    image = series_to_volume(case.paths).image
    size, spacing, direction = GEOMETRY[name]
    assert image.GetSize() == size
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=TOLERANCE_MM)
    np.testing.assert_allclose(image.GetDirection(), direction, atol=TOLERANCE_MM)
    np.testing.assert_allclose(image.GetOrigin(), case.origin, atol=1e-3)
    voxels = sitk.GetArrayViewFromImage(image)[SUBSAMPLE]
    np.testing.assert_allclose(voxels, case.sample, rtol=0, atol=case.quantum)
    assert voxels.std() > 0.01 * np.abs(voxels).max()  # not an empty crop


def test_oblique_case_is_tilted_15_degrees(written: dict[str, Written]) -> None:
    normal = np.reshape(series_to_volume(written["colin27-oblique15"].paths).image.GetDirection(), (3, 3))[:, 2]
    assert math.degrees(math.acos(normal @ (0.0, 0.0, 1.0))) == pytest.approx(15.0, abs=1e-3)


@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_case_is_selected_as_its_labelled_contrast(written: dict[str, Written], name: str) -> None:
    """The SeriesDescription and timing make selection take the series for the contrast it is labelled."""
    case = written[name]
    config = SelectionSection(models={Contrast.T1: Path("t1.pt"), Contrast.T2: Path("t2.pt"), Contrast.FLAIR: "f.pt"})
    (series,) = group_by_series(read_headers(case.paths))
    decision = select_series(series, config)
    assert decision.contrast == Contrast(case.case.contrast), decision.reason
    assert decision.selected, decision.reason


def test_every_write_is_a_new_study_and_series_of_the_fake_patient(written: dict[str, Written]) -> None:
    headers = [pydicom.dcmread(w.paths[0], stop_before_pixels=True) for w in written.values()]
    assert len({ds.StudyInstanceUID for ds in headers}) == len({ds.SeriesInstanceUID for ds in headers}) == len(headers)
    assert {ds.PatientID for ds in headers} == {SYNTHETIC_PATIENT_ID}


@pytest.mark.parametrize("name", ["noise", "phantom"])
def test_random_cases_are_deterministic(written: dict[str, Written], name: str) -> None:
    """Fixed seeds: building a case again gives the same voxels (the corpus calibrates thresholds)."""
    case = written[name]
    again = sitk.GetArrayFromImage(case_volume(case.case))  # a copy: a view would outlive its image
    np.testing.assert_array_equal(again[SUBSAMPLE], case.sample)
