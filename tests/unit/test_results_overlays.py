"""Secondary Capture overlays and the summary image (node/results): RGB images of the slices with the largest
findings, drawn as the source shows them, valid for dciodvfy, referencing their source images; the summary
as SC and PNG. Uses the series of test_results.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from node.config import ResultsSection
from node.results import build_overlays, build_secondary_captures, build_summary, findings_from
from node.results.overlays import OVERLAY_LONGEST_SIDE, overlay_slices
from node.results.render import CONTOUR
from node.results.summary import LEGEND_HEIGHT, WIDTH, summary_slices
from tests.unit.test_results import GEOMETRIES, Case, dciodvfy, make_case

TIMINGS = {"preprocess": 6.1, "model": 30.2, "total": 41.3}


@pytest.fixture(scope="module")
def results_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return {name: make_case(name, tmp_path_factory.mktemp(f"sc-series-{name}")) for name in GEOMETRIES}


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_overlays_are_valid_rgb_images_of_the_largest_findings(
    results_cases: dict[str, Case], geometry: str, tmp_path: Path
) -> None:
    case = results_cases[geometry]
    overlays = build_overlays(case.volume, case.sources, case.findings, ResultsSection(max_overlay_images=5))
    areas = case.findings.slice_areas()
    chosen = overlay_slices(case.findings, 5)
    assert len(overlays) == len(chosen) == 5 < np.count_nonzero(areas)
    assert chosen == sorted(chosen) and min(areas[chosen]) >= np.sort(areas)[-5]  # the five largest, in order

    column_mm, row_mm, _ = case.volume.image.GetSpacing()
    rows, columns = sitk.GetArrayViewFromImage(case.volume.image).shape[1:]
    height_mm, width_mm = rows * row_mm, columns * column_mm
    for number, (ds, k) in enumerate(zip(overlays, chosen, strict=True), start=1):
        dciodvfy(ds, tmp_path / f"overlay{number}.dcm")
        assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated) == (3, "RGB", 8)
        assert ds.InstanceNumber == number
        # square display pixels whose size is PixelSpacing; the anatomy spans the source's field of view
        spacing = [float(v) for v in ds.PixelSpacing]
        assert spacing[0] == spacing[1]
        assert ds.Columns == round(width_mm / spacing[0]) and max(ds.Columns, ds.Rows) >= OVERLAY_LONGEST_SIDE
        assert ds.Rows > round(height_mm / spacing[0])  # plus the burned-in text band
        assert ds.Columns * spacing[0] == pytest.approx(width_mm, rel=0.01)
        source = case.volume.slice_sources[k]
        for sequence in (ds.ReferencedImageSequence, ds.SourceImageSequence):
            assert sequence[0].ReferencedSOPInstanceUID == source.sop_instance_uid
            assert sequence[0].get("ReferencedFrameNumber") == source.frame_number
        assert ds.StudyInstanceUID == case.sources[0].StudyInstanceUID
        assert ds.PatientID == case.sources[0].PatientID
        assert ds.BurnedInAnnotation == "YES" and "RESEARCH" in ds.ImageComments
        assert "research" in ds.SeriesDescription.lower()
    assert len({ds.SeriesInstanceUID for ds in overlays}) == 1
    assert len({ds.SOPInstanceUID for ds in overlays}) == len(overlays)


def test_overlay_is_drawn_as_the_source_displays_it(results_cases: dict[str, Case]) -> None:
    """The cyan contour lies where the mask is in the source's own rows and columns (no flip, no transpose),
    and the slice orientation letters are those of the source (15-degree oblique: column also points head)."""
    case = results_cases["oblique"]
    ds = build_overlays(case.volume, case.sources, case.findings, ResultsSection(max_overlay_images=1))[0]
    k = overlay_slices(case.findings, 1)[0]
    mask = case.findings.mask[k]
    spacing = float(ds.PixelSpacing[0])
    column_mm, row_mm, _ = case.volume.image.GetSpacing()
    picture = ds.pixel_array
    cyan = np.all(picture == CONTOUR, axis=2)
    rows, columns = np.nonzero(cyan)
    # contour centre, back in source voxels, is the mask centre
    centre = (rows.mean() * spacing / row_mm, columns.mean() * spacing / column_mm)
    np.testing.assert_allclose(centre, np.argwhere(mask).mean(axis=0), atol=1.5)
    assert list(ds.PatientOrientation) == ["L", "PH"]


def test_overlay_count_follows_the_cap_and_nothing_found_gives_none(results_cases: dict[str, Case]) -> None:
    case = results_cases["axial"]
    with_findings = int(np.count_nonzero(case.findings.slice_areas()))
    for cap, expected in ((0, 0), (3, 3), (1000, with_findings)):
        options = ResultsSection(max_overlay_images=cap)
        assert len(build_overlays(case.volume, case.sources, case.findings, options)) == expected
    nothing = findings_from(
        np.zeros_like(case.findings.mask), case.findings.score, 0.9, "m", "v", case.volume.image.GetSpacing()
    )
    assert build_overlays(case.volume, case.sources, nothing, ResultsSection()) == []


@pytest.mark.parametrize("geometry", ["oblique", "enhanced"])
def test_summary_is_a_valid_sc_and_a_png_of_the_same_picture(
    results_cases: dict[str, Case], geometry: str, tmp_path: Path
) -> None:
    case = results_cases[geometry]
    sc, png = build_summary(case.volume, case.sources, case.findings, TIMINGS, ResultsSection())
    dciodvfy(sc, tmp_path / "summary.dcm")
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.mode == "RGB" and picture.size == (WIDTH, sc.Rows)
    np.testing.assert_array_equal(np.asarray(picture), sc.pixel_array)
    assert (sc.Columns, sc.SamplesPerPixel) == (WIDTH, 3) and "PixelSpacing" not in sc  # a composite
    assert 400 < sc.Rows < 900
    key = summary_slices(case.findings)
    assert [r.ReferencedSOPInstanceUID for r in sc.ReferencedImageSequence] == [
        case.volume.slice_sources[k].sop_instance_uid for k in key
    ]
    (tmp_path / "summary.png").write_bytes(png)


def test_summary_with_nothing_found_shows_mid_brain_slices(results_cases: dict[str, Case], tmp_path: Path) -> None:
    case = results_cases["axial"]
    nothing = findings_from(
        np.zeros_like(case.findings.mask), case.findings.score, 0.9, "m", "v", case.volume.image.GetSpacing()
    )
    key = summary_slices(nothing)
    brain = np.flatnonzero(case.findings.score.any(axis=(1, 2)))
    assert len(key) == 3 and brain[0] < key[0] < key[1] < key[2] < brain[-1]
    sc, png = build_summary(case.volume, case.sources, nothing, {}, ResultsSection())
    dciodvfy(sc, tmp_path / "summary.dcm")
    assert not np.all(sc.pixel_array[:-LEGEND_HEIGHT] == CONTOUR, axis=2).any()  # no mask outline (legend aside)


def test_secondary_capture_series_is_summary_then_overlays_with_new_uids(
    results_cases: dict[str, Case], tmp_path: Path
) -> None:
    case = results_cases["reversed"]
    options = ResultsSection(max_overlay_images=3, overlay_series_number=42)
    first, png = build_secondary_captures(case.volume, case.sources, case.findings, TIMINGS, options)
    second, _ = build_secondary_captures(case.volume, case.sources, case.findings, TIMINGS, options)
    assert [ds.InstanceNumber for ds in first] == [1, 2, 3, 4]
    assert {ds.SeriesNumber for ds in first} == {42} and len({ds.SeriesInstanceUID for ds in first}) == 1
    assert first[0].SeriesInstanceUID != second[0].SeriesInstanceUID
    assert not {ds.SOPInstanceUID for ds in first} & {ds.SOPInstanceUID for ds in second}
    assert np.array_equal(first[0].pixel_array, np.asarray(Image.open(io.BytesIO(png))))
    for i, ds in enumerate(first):
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
        assert pydicom.dcmread(tmp_path / f"{i}.dcm").SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
