"""Results back to PACS (node/results): the anomaly SEG written from real brains stored as DICOM series in
several geometries, validated by dciodvfy and read back with highdicom: same mask on every source image,
frames referencing the right source images and frames; figures, report.json and the [results] config.

The SC overlays and summary are tested in test_results_overlays.py; both use the series built here.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import RLELossless

from node.config import ResultsSection, load_config
from node.results import (
    Findings,
    Region,
    build_measurement_report,
    build_segmentation,
    build_segmentations,
    findings_from,
    largest_region,
    series_report,
    write_report,
)
from node.results.findings import count_components
from node.volume import SeriesVolume, series_to_volume
from tests.brains import mni152_t1
from tests.dicom_series import AXIAL, CORONAL, centred_grid, resample, rotated, write_enhanced_mr, write_mr_series
from tests.peers import validate_with_dciodvfy

REPO = Path(__file__).resolve().parents[2]
STUDY_ATTRIBUTES = {  # what a scanner writes and the test writer leaves out
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "StudyDate": "20250102",
    "StudyTime": "101500",
    "StudyID": "S1",
    "AccessionNumber": "ACC1",
    "ReferringPhysicianName": "",
    "SeriesDescription": "T1 MPRAGE",
    "BodyPartExamined": "BRAIN",
}


@dataclass(frozen=True)
class Case:
    """A stored series, its volume, its source headers (in the order a caller might pass them) and findings."""

    name: str
    paths: list[Path]
    volume: SeriesVolume
    sources: list[Dataset]
    findings: Findings


def blob_findings(volume: SeriesVolume, centre: tuple[float, float, float] = (0.5, 0.4, 0.35)) -> Findings:
    """An ellipsoid of high score inside the head (k, rows, cols fractions of the grid), a low score elsewhere
    in the head, 0 outside; the mask is score >= threshold, plus a lone voxel as a second component."""
    voxels = sitk.GetArrayFromImage(volume.image)
    k, r, c = np.indices(voxels.shape, dtype=np.float32)
    shape = np.array(voxels.shape, dtype=np.float32)
    d2 = sum(((axis - f * n) / (0.12 * n)) ** 2 for axis, f, n in zip((k, r, c), centre, shape, strict=True))
    head = voxels > 0.1 * voxels.max()
    score = np.where(head, 0.02 + 0.5 * np.exp(-d2), 0.0).astype(np.float32)
    mask = score >= 0.2
    lone = tuple(int(0.7 * n) for n in voxels.shape)
    score[lone], mask[lone] = 0.3, True
    return findings_from(mask, score, 0.2, "cDDPM default T1", "3f2a9c01be77", volume.image.GetSpacing())


def with_study_attributes(paths: list[Path]) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in STUDY_ATTRIBUTES.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


def make_case(name: str, folder: Path) -> Case:
    """Small (64x64-ish, 20-30 slices) MNI152 series: axial, 15-degree oblique with non-square pixels,
    axial passed in reversed file order, and Enhanced MR (coronal, frames shuffled)."""
    brain = mni152_t1()
    if name == "enhanced":
        grid = centred_grid(brain, CORONAL, (3.0, 3.0, 3.0), (60, 56, 24))
        order = random.Random(5).sample(range(24), 24)
        paths = [write_enhanced_mr(resample(brain, grid), folder / "enhanced.dcm", frame_order=order)]
    elif name == "oblique":
        grid = centred_grid(brain, rotated(AXIAL, 0, 15.0), (2.6, 3.2, 4.0), (64, 56, 28))
        paths = write_mr_series(resample(brain, grid), folder)
    else:
        grid = centred_grid(brain, AXIAL, (3.0, 3.0, 4.0), (64, 64, 26))
        paths = write_mr_series(resample(brain, grid), folder)
    with_study_attributes(paths)
    if name == "reversed":
        paths = paths[::-1]
    volume = series_to_volume(paths)
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    return Case(name, paths, volume, sources, blob_findings(volume))


GEOMETRIES = ["axial", "oblique", "reversed", "enhanced"]


@pytest.fixture(scope="session")
def results_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return {name: make_case(name, tmp_path_factory.mktemp(f"series-{name}")) for name in GEOMETRIES}


def dciodvfy(ds: Dataset, path: Path) -> list[str]:
    """Write ``ds`` and validate it (fails on any "Error" line); returns the warnings."""
    ds.save_as(path, enforce_file_format=True)
    return validate_with_dciodvfy(path)


def read_mask(seg: hd.seg.Segmentation, volume: SeriesVolume, omitted: bool = False) -> np.ndarray:
    """The SEG's segment 1 on every slice k of the volume, looked up by source instance (and frame)."""
    slices = volume.slice_sources
    if slices[0].frame_number is None:
        pixels = seg.get_pixels_by_source_instance(
            [s.sop_instance_uid for s in slices], segment_numbers=[1], assert_missing_frames_are_empty=omitted
        )
    else:
        pixels = seg.get_pixels_by_source_frame(
            slices[0].sop_instance_uid,
            source_frame_numbers=[s.frame_number for s in slices],
            segment_numbers=[1],
            assert_missing_frames_are_empty=omitted,
        )
    return pixels[..., 0]


def source_positions(case: Case) -> dict[tuple[str, int | None], tuple[float, ...]]:
    """ImagePositionPatient of every source image (and frame), from the files themselves."""
    positions = {}
    for path in case.paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "PerFrameFunctionalGroupsSequence" in ds:
            for j, groups in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
                position = groups.PlanePositionSequence[0].ImagePositionPatient
                positions[(ds.SOPInstanceUID, j)] = tuple(float(v) for v in position)
        else:
            positions[(ds.SOPInstanceUID, None)] = tuple(float(v) for v in ds.ImagePositionPatient)
    return positions


# --- SEG -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_seg_is_valid_and_reads_back_as_the_mask_on_every_source_image(
    results_cases: dict[str, Case], geometry: str, tmp_path: Path
) -> None:
    case = results_cases[geometry]
    seg = build_segmentation(case.volume, case.sources, case.findings, ResultsSection())
    path = tmp_path / "seg.dcm"
    dciodvfy(seg, path)

    back = hd.seg.segread(path)
    assert back.SegmentationType == "BINARY" and back.NumberOfFrames == len(case.volume.slice_sources)
    np.testing.assert_array_equal(read_mask(back, case.volume), case.findings.mask)

    # every frame references one source image (and frame) and lies exactly where that image lies
    positions = source_positions(case)
    referenced = []
    for groups in back.PerFrameFunctionalGroupsSequence:
        source = groups.DerivationImageSequence[0].SourceImageSequence[0]
        key = (source.ReferencedSOPInstanceUID, source.get("ReferencedFrameNumber"))
        referenced.append(key)
        frame_position = [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(frame_position, positions[key], atol=1e-3)
    assert sorted(referenced, key=str) == sorted(positions, key=str)
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == case.volume.series_instance_uid
    assert back.FrameOfReferenceUID == case.volume.frame_of_reference_uid


def test_seg_describes_the_segment_the_model_and_research_use(results_cases: dict[str, Case]) -> None:
    case = results_cases["axial"]
    seg = build_segmentation(case.volume, case.sources, case.findings, ResultsSection(seg_series_number=77))
    segment = seg.SegmentSequence[0]
    assert (segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType) == (1, "Anomaly", "AUTOMATIC")
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "49755003"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("cDDPM default T1", "3f2a9c01be77")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # DCM Artificial Intelligence
    assert seg.SeriesNumber == 77
    for text in (seg.SeriesDescription, seg.ContentDescription, seg.ImageComments):
        assert "research" in text.lower()


def test_every_build_is_a_new_series_of_new_instances_in_the_source_study(results_cases: dict[str, Case]) -> None:
    """Orthanc silently keeps the first object of a UID: a re-run must not reuse one."""
    case = results_cases["oblique"]
    first, second = (build_segmentation(case.volume, case.sources, case.findings, ResultsSection()) for _ in range(2))
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    assert first.SeriesInstanceUID != case.volume.series_instance_uid
    source = case.sources[0]
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "StudyDate", "AccessionNumber"):
        assert first[keyword].value == source[keyword].value, keyword


def test_omit_policy_keeps_only_frames_with_findings(results_cases: dict[str, Case], tmp_path: Path) -> None:
    case = results_cases["reversed"]
    kept = build_segmentation(case.volume, case.sources, case.findings, ResultsSection(seg_empty_frames="keep"))
    omitted = build_segmentation(case.volume, case.sources, case.findings, ResultsSection(seg_empty_frames="omit"))
    with_findings = int(np.count_nonzero(case.findings.slice_areas()))
    assert kept.NumberOfFrames == len(case.volume.slice_sources) > omitted.NumberOfFrames == with_findings
    dciodvfy(omitted, tmp_path / "omitted.dcm")
    back = hd.seg.segread(tmp_path / "omitted.dcm")
    np.testing.assert_array_equal(read_mask(back, case.volume, omitted=True), case.findings.mask)


@pytest.mark.parametrize("policy", ["keep", "omit"])
@pytest.mark.parametrize("geometry", ["axial", "enhanced"])
def test_nothing_found_still_gives_a_valid_seg_with_every_frame(
    results_cases: dict[str, Case], policy: str, geometry: str, tmp_path: Path
) -> None:
    """A SEG needs one frame at least; with nothing found both policies keep all (empty) frames, which every
    viewer shows as "analysed, nothing found"."""
    case = results_cases[geometry]
    nothing = findings_from(
        np.zeros_like(case.findings.mask), case.findings.score * 0, 0.2, "m", "v", case.volume.image.GetSpacing()
    )
    seg = build_segmentation(case.volume, case.sources, nothing, ResultsSection(seg_empty_frames=policy))
    assert seg.NumberOfFrames == len(case.volume.slice_sources)
    dciodvfy(seg, tmp_path / "empty.dcm")
    assert not read_mask(hd.seg.segread(tmp_path / "empty.dcm"), case.volume).any()


@pytest.mark.parametrize("geometry", ["oblique", "enhanced"])
def test_score_segment_is_a_compressed_fractional_seg_in_the_same_series(
    results_cases: dict[str, Case], geometry: str, tmp_path: Path
) -> None:
    case = results_cases[geometry]
    binary, fractional = build_segmentations(
        case.volume, case.sources, case.findings, ResultsSection(seg_score_segment=True)
    )
    assert binary.SegmentationType == "BINARY" and fractional.SegmentationType == "FRACTIONAL"
    assert binary.SeriesInstanceUID == fractional.SeriesInstanceUID
    assert binary.SOPInstanceUID != fractional.SOPInstanceUID
    assert (binary.InstanceNumber, fractional.InstanceNumber) == (1, 2)
    assert fractional.file_meta.TransferSyntaxUID == RLELossless
    dciodvfy(fractional, tmp_path / "score.dcm")
    back = hd.seg.segread(tmp_path / "score.dcm")
    score = read_mask(back, case.volume)  # rescaled to [0, 1] by highdicom
    expected = case.findings.score / case.findings.max_score
    np.testing.assert_allclose(score, expected, atol=1 / 255 + 1e-6)
    assert len(build_segmentations(case.volume, case.sources, case.findings, ResultsSection())) == 1


# --- SR (TID 1500) ---------------------------------------------------------------------------------------------


def sr_volume_ml(sr: hd.sr.Comprehensive3DSR) -> tuple[float, str, str, list[int]]:
    """The one volume measurement of a read-back report: value, unit, referenced SEG UID and segment numbers."""
    [group] = sr.content.get_volumetric_roi_measurement_groups()
    [measurement] = group.get_measurements(name=codes.SCT.Volume)
    segment = group.referenced_segment
    return (
        measurement.value,
        measurement.unit.value,
        segment.referenced_sop_instance_uid,
        list(segment.referenced_segment_numbers),
    )


def sr_outline(sr: hd.sr.Comprehensive3DSR) -> tuple[str, np.ndarray, str, int | None, list[str]]:
    """The planar group that draws the finding on an image: graphic type, points (column, row), the SOP Instance
    UID and frame number (None: single-frame) of the image it is SELECTED FROM, and its tracking UIDs
    (its own, then the volumetric group's)."""
    [volumetric] = sr.content.get_volumetric_roi_measurement_groups()
    [planar] = sr.content.get_planar_roi_measurement_groups()
    assert planar.get_measurements() == []  # it draws; the volume is measured once, in the volumetric group
    region = planar.roi
    [image] = region.ContentSequence
    assert (region.ValueType, image.ValueType, image.RelationshipType) == ("SCOORD", "IMAGE", "SELECTED FROM")
    [ref] = image.ReferencedSOPSequence
    frames = ref.get("ReferencedFrameNumber")
    frame = None if frames is None else int(frames if isinstance(frames, int) else frames[0])
    uids = [planar.tracking_uid, volumetric.tracking_uid]
    return region.GraphicType, region.value, ref.ReferencedSOPInstanceUID, frame, uids


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon (first point repeated last)."""
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2)


@pytest.mark.parametrize("geometry", ["reversed", "enhanced"])
def test_sr_measures_the_seg_segment_and_reads_back(
    results_cases: dict[str, Case], geometry: str, tmp_path: Path
) -> None:
    case = results_cases[geometry]
    seg = build_segmentation(case.volume, case.sources, case.findings, ResultsSection())
    sr = build_measurement_report(seg, case.sources, case.findings, ResultsSection())
    dciodvfy(sr, tmp_path / "sr.dcm")

    back = hd.sr.srread(tmp_path / "sr.dcm")
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert back.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    volume, unit, seg_uid, segment = sr_volume_ml(back)
    assert volume == pytest.approx(case.findings.anomaly_volume_ml, abs=1e-3) and volume > 0
    assert (unit, seg_uid, segment) == ("mL", seg.SOPInstanceUID, [1])
    [group] = back.content.get_volumetric_roi_measurement_groups()
    source = group.referenced_segment.source_series_for_segmentation
    assert source.value == case.volume.series_instance_uid
    assert (back.StudyInstanceUID, back.PatientID) == (case.sources[0].StudyInstanceUID, case.sources[0].PatientID)
    assert back.SeriesInstanceUID not in {seg.SeriesInstanceUID, case.volume.series_instance_uid}
    assert back.SeriesNumber == 9903 and "research" in back.SeriesDescription.lower()
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {seg.SOPInstanceUID} | {s.sop_instance_uid for s in case.volume.slice_sources}


@pytest.mark.parametrize("geometry", ["reversed", "enhanced"])
def test_sr_outlines_the_finding_on_the_slice_with_most_of_it(
    results_cases: dict[str, Case], geometry: str, tmp_path: Path
) -> None:
    """OHIF (3.13) shows an SR measurement only through image coordinates on a source image: a planar group of
    the same finding outlines it on the source slice (or frame) holding most of the mask."""
    case = results_cases[geometry]
    seg = build_segmentation(case.volume, case.sources, case.findings, ResultsSection())
    dciodvfy(build_measurement_report(seg, case.sources, case.findings, ResultsSection()), tmp_path / "sr.dcm")
    graphic, points, sop_uid, frame, (planar_uid, volumetric_uid) = sr_outline(hd.sr.srread(tmp_path / "sr.dcm"))
    assert graphic == "POLYLINE" and planar_uid == volumetric_uid  # one finding, so OHIF merges the groups
    assert (points[0] == points[-1]).all() and len(points) >= 5  # closed, at least a rectangle

    areas = case.findings.slice_areas()
    [k] = [
        k for k, s in enumerate(case.volume.slice_sources) if (s.sop_instance_uid, s.frame_number) == (sop_uid, frame)
    ]
    assert areas[k] == areas.max() > 0
    if geometry == "enhanced":
        assert frame is not None and sop_uid == case.volume.slice_sources[0].sop_instance_uid
    # The outline is the biggest region of that slice (the blob; the lone voxel lies elsewhere), in its pixels.
    rows, cols = np.nonzero(case.findings.mask[k])
    assert polygon_area(points) == areas[k]
    assert (points[:, 0].min(), points[:, 0].max()) == (cols.min(), cols.max() + 1)
    assert (points[:, 1].min(), points[:, 1].max()) == (rows.min(), rows.max() + 1)


def test_sr_of_nothing_found_measures_zero(results_cases: dict[str, Case], tmp_path: Path) -> None:
    """ "Analysed, nothing found" is a measurement too: 0 mL of the (empty) segment."""
    case = results_cases["axial"]
    nothing = findings_from(
        np.zeros_like(case.findings.mask), case.findings.score * 0, 0.2, "m", "v", case.volume.image.GetSpacing()
    )
    seg = build_segmentation(case.volume, case.sources, nothing, ResultsSection())
    sr = build_measurement_report(seg, case.sources, nothing, ResultsSection())
    dciodvfy(sr, tmp_path / "sr.dcm")
    back = hd.sr.srread(tmp_path / "sr.dcm")
    assert sr_volume_ml(back)[:3] == (0.0, "mL", seg.SOPInstanceUID)
    assert back.content.get_planar_roi_measurement_groups() == []  # no finding, no outline to draw


def test_bare_sources_and_full_datasets_both_work(tmp_path: Path) -> None:
    """Sources as the test writer makes them (no StudyDate, PatientSex, ...) and with pixel data: highdicom
    needs the Type 2 patient/study attributes present, so they are filled in on a copy; the caller's data sets
    stay as they were."""
    brain = mni152_t1()
    paths = write_mr_series(resample(brain, centred_grid(brain, AXIAL, (4.0, 4.0, 4.0), (40, 40, 20))), tmp_path)
    volume = series_to_volume(paths)
    full = [pydicom.dcmread(path) for path in paths]
    findings = blob_findings(volume)
    seg = build_segmentation(volume, full, findings, ResultsSection())
    assert "PatientSex" not in full[0] and "PixelData" in full[0]
    warnings = dciodvfy(seg, tmp_path / "seg.dcm")
    assert all("DICOMDIR" in line for line in warnings)  # only the source's missing StudyDate/Time/ID
    np.testing.assert_array_equal(read_mask(hd.seg.segread(tmp_path / "seg.dcm"), volume), findings.mask)


def test_missing_source_or_wrong_grid_is_refused(results_cases: dict[str, Case]) -> None:
    case = results_cases["axial"]
    with pytest.raises(ValueError, match="source instance"):
        build_segmentation(case.volume, case.sources[1:], case.findings, ResultsSection())
    small = findings_from(case.findings.mask[1:], case.findings.score[1:], 0.2, "m", "v", (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="series grid"):
        build_segmentation(case.volume, case.sources, small, ResultsSection())


# --- findings, report, config ----------------------------------------------------------------------------------


def test_findings_figures() -> None:
    mask = np.zeros((6, 8, 8), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[5, 7, 7] = True  # touches nothing: a second component
    mask[3, 3, 3] = True  # corner-touches the first block: same component under 26-connectivity
    score = np.where(mask, 0.5, 0.01).astype(np.float32)
    score[0, 0, 0] = 0.7
    findings = findings_from(mask, score, 0.3, "model", "abc", (2.0, 1.0, 0.5))
    assert findings.components == 2 == count_components(mask)
    assert findings.anomaly_volume_ml == pytest.approx(10 * 1.0 / 1000)
    assert findings.max_score == pytest.approx(0.7)
    assert findings.slice_areas().tolist() == [0, 4, 4, 1, 0, 1]
    assert not findings.mask.flags.writeable and mask.flags.writeable  # shared read-only; caller's untouched
    with pytest.raises(ValueError, match="same"):
        findings_from(mask, score[1:], 0.3, "model", "abc", (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="NaN"):
        findings_from(mask, np.full_like(score, np.nan), 0.3, "model", "abc", (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="model name"):
        findings_from(mask, score, 0.3, " ", "abc", (1.0, 1.0, 1.0))


def test_largest_region_is_the_biggest_component_placed_in_patient_coordinates() -> None:
    mask = np.zeros((6, 10, 10), bool)  # (k, rows, cols)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[4, 6:9, 6:9] = True  # 9 voxels: the largest
    findings = findings_from(mask, mask.astype(np.float32), 0.5, "cDDPM", "abc", (0.5, 0.5, 2.0))
    grid = sitk.Image(10, 10, 6, sitk.sitkUInt8)
    grid.SetSpacing((0.5, 0.5, 2.0))
    grid.SetOrigin((-10.0, 20.0, 30.0))
    region = largest_region(findings, grid)
    assert region is not None and region.volume_ml == pytest.approx(9 * 0.5 * 0.5 * 2.0 / 1000)
    assert region.centre_lps == (-10.0 + 7 * 0.5, 20.0 + 7 * 0.5, 30.0 + 4 * 2.0)
    assert largest_region(findings_from(mask & False, mask * 0.0, 0.5, "m", "v", (1, 1, 1)), grid) is None


def test_report_entries_and_atomic_write(tmp_path: Path) -> None:
    mask = np.zeros((4, 4, 4), bool)
    mask[1, 1, 1] = True
    findings = findings_from(mask, mask.astype(np.float32) * 0.42, 0.25, "cDDPM", "abc123", (1.0, 1.0, 2.0))
    region = Region(volume_ml=0.002, centre_lps=(1.0, 2.0, 3.0))
    quality = {"registration_similarity": 0.65, "coverage": 1.0}
    analysed = series_report(
        "1.2.3", True, "selected: T1", findings, None, None, {"model": 1.23456, "total": 2}, region, quality=quality
    )
    skipped = series_report("1.2.4", False, "localizer", None, None, None, {})
    refused = series_report("1.2.5", True, "quality gate: ...", None, None, None, {}, quality=quality)
    assert analysed == {
        "series_uid": "1.2.3",
        "selected": True,
        "analysed": True,
        "reason": "selected: T1",
        "model": "cDDPM abc123",
        "threshold": 0.25,
        "calibration": None,
        "anomaly_volume_ml": 0.002,
        "components": 1,
        "max_score": 0.42,
        "largest_region": {"volume_ml": 0.002, "centre_lps": [1.0, 2.0, 3.0]},
        "timings_s": {"model": 1.235, "total": 2.0},
        "quality": quality,
    }
    assert skipped["anomaly_volume_ml"] is None and skipped["components"] is None and skipped["model"] is None
    assert skipped["largest_region"] is None and skipped["analysed"] is False and skipped["quality"] is None
    assert (refused["selected"], refused["analysed"], refused["quality"]) == (True, False, quality)
    path = tmp_path / "out" / "report.json"
    write_report(path, [analysed, skipped])
    write_report(path, [analysed, skipped])  # replaces, leaves no temporary file behind
    assert json.loads(path.read_text()) == {"series": [analysed, skipped]}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]
    with pytest.raises(ValueError):
        write_report(path, [{"bad": float("nan")}])
    assert json.loads(path.read_text()) == {"series": [analysed, skipped]}  # the old report survives


def test_results_config_defaults_shipped_file_and_errors(tmp_path: Path) -> None:
    shipped = load_config(REPO / "config" / "node.toml").results
    assert shipped == ResultsSection()
    assert (shipped.seg_empty_frames, shipped.seg_score_segment, shipped.max_overlay_images) == ("keep", False, 12)
    assert (shipped.seg_series_number, shipped.overlay_series_number, shipped.sr_series_number) == (9901, 9902, 9903)
    assert shipped.structured_report is True
    for bad in (
        'seg_empty_frames = "drop"',
        "max_overlay_images = -1",
        "overlay_series_number = 9901",
        "sr_series_number = 9902",
    ):
        path = tmp_path / "node.toml"
        path.write_text(f"[results]\n{bad}\n")
        with pytest.raises(Exception, match="results"):
            load_config(path)
