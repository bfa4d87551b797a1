"""The NOT SCREENED notice (node/results/notice.py): one RGB Secondary Capture, built from source headers only,
that tells a radiologist a selected series was never screened. Written, validated by dciodvfy and read back
with pydicom, as the other result objects are."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLossless

from node.config import ResultsSection, load_config
from node.results import build_not_screened_notice
from node.results.notice import NOTICE_SIZE, REASON_LINES, wrap
from node.results.render import font
from node.results.sources import equipment
from tests.dicom_series import write_enhanced_mr
from tests.mr_files import mr_series, write_series
from tests.unit.test_results import REPO, STUDY_ATTRIBUTES, dciodvfy, with_study_attributes

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
REASON = "volume rejected: slice spacing varies by 2.4 mm between instances 12 and 13 (gap in the series)"
LONG_REASON = ("model error: RuntimeError: CUDA out of memory while sampling the cDDPM at step 412 of 1000; " * 4)[:300]


def stored_headers(folder: Path, count: int = 6) -> tuple[list[Path], list[Dataset]]:
    """A written MR series with a scanner's study attributes; its files in instance order and their headers read
    back without pixel data, shuffled (a caller may pass them in any order)."""
    paths = write_series(mr_series(count, size=16), folder)
    with_study_attributes(paths)
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    return paths, random.Random(count).sample(headers, count)


def read_back(ds: Dataset, path: Path) -> Dataset:
    """Write ``ds``, validate it with dciodvfy (no errors) and read it again."""
    dciodvfy(ds, path)
    return pydicom.dcmread(path)


@pytest.mark.peers
def test_notice_is_a_valid_sc_in_the_source_study_referencing_every_image(tmp_path: Path) -> None:
    _, sources = stored_headers(tmp_path / "series")
    options = ResultsSection()
    sc, png = build_not_screened_notice(sources, REASON, options)
    notice = read_back(sc, tmp_path / "notice.dcm")

    assert notice.SOPClassUID == SECONDARY_CAPTURE
    assert (notice.SamplesPerPixel, notice.PhotometricInterpretation, notice.BitsAllocated) == (3, "RGB", 8)
    assert (notice.Columns, notice.Rows) == NOTICE_SIZE
    assert notice.SeriesDescription.startswith("NOT SCREENED") and len(notice.SeriesDescription) <= 64
    assert "research" in notice.SeriesDescription.lower()
    assert notice.SeriesNumber == options.notice_series_number == 9904
    assert notice.InstanceNumber == 1
    assert notice.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert notice.SOPInstanceUID not in {ds.SOPInstanceUID for ds in sources}
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", *list(STUDY_ATTRIBUTES)[:6]):
        assert notice.get(keyword) == sources[0].get(keyword), keyword
    made_by = equipment(options)
    assert (notice.Manufacturer, notice.ManufacturerModelName) == (made_by.manufacturer, made_by.model_name)
    assert notice.BurnedInAnnotation == "YES" and list(notice.ImageType) == ["DERIVED", "SECONDARY"]
    assert notice.ImageComments.startswith("RESEARCH USE ONLY") and REASON in notice.ImageComments
    assert REASON in notice.DerivationDescription and "PixelSpacing" not in notice
    assert notice.PatientOrientation == ""  # a picture of text shows no anatomy
    by_number = sorted(sources, key=lambda ds: ds.InstanceNumber)
    for sequence in (notice.ReferencedImageSequence, notice.SourceImageSequence):
        assert [item.ReferencedSOPInstanceUID for item in sequence] == [ds.SOPInstanceUID for ds in by_number]
        assert {item.ReferencedSOPClassUID for item in sequence} == {sources[0].SOPClassUID}
        assert all("ReferencedFrameNumber" not in item for item in sequence)

    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.mode == "RGB" and picture.size == NOTICE_SIZE
    np.testing.assert_array_equal(np.asarray(picture), notice.pixel_array)
    (tmp_path / "notice.png").write_bytes(png)


def test_every_build_gets_new_uids_and_the_configured_series_number(tmp_path: Path) -> None:
    _, sources = stored_headers(tmp_path / "series")
    options = ResultsSection(notice_series_number=42)
    first, _ = build_not_screened_notice(sources, REASON, options)
    second, _ = build_not_screened_notice(sources, REASON, options)
    assert first.SeriesNumber == second.SeriesNumber == 42
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.StudyInstanceUID == second.StudyInstanceUID == sources[0].StudyInstanceUID


@pytest.mark.peers
def test_a_long_reason_is_wrapped_and_kept_whole_in_the_header(tmp_path: Path) -> None:
    _, sources = stored_headers(tmp_path / "series")
    short_sc, short_png = build_not_screened_notice(sources, REASON, ResultsSection())
    assert len(LONG_REASON) == 300
    long_sc, long_png = build_not_screened_notice(sources, LONG_REASON, ResultsSection())
    notice = read_back(long_sc, tmp_path / "long.dcm")
    assert long_png != short_png
    assert not np.array_equal(notice.pixel_array, short_sc.pixel_array)
    assert LONG_REASON.strip() in notice.ImageComments  # the picture may cut it; the header holds all of it
    assert "\n" not in notice.ImageComments

    huge = "x" * 20000 + "\nsecond line"
    sc, _ = build_not_screened_notice(sources, huge, ResultsSection())
    notice = read_back(sc, tmp_path / "huge.dcm")
    assert len(notice.ImageComments) == 10240 and notice.ImageComments.endswith("...")
    assert len(notice.DerivationDescription) == 1024 and notice.DerivationDescription.endswith("...")

    sc, _ = build_not_screened_notice(sources, "  decoder failed:\n\tJPEG 2000  \n", ResultsSection())
    assert sc.ImageComments.endswith("NOT SCREENED: decoder failed: JPEG 2000")
    sc, _ = build_not_screened_notice(sources, "", ResultsSection())
    assert sc.ImageComments.endswith("no reason given")


def test_reason_wraps_over_at_most_three_lines_within_the_width() -> None:
    face = font(28)
    lines = wrap(LONG_REASON, face, 800, REASON_LINES)
    assert len(lines) == REASON_LINES and lines[-1].endswith("...")
    assert all(face.getlength(line) <= 800 for line in lines)
    assert " ".join(lines).startswith(LONG_REASON[:100])
    assert wrap(REASON, face, 800, REASON_LINES) == [REASON] if face.getlength(REASON) <= 800 else True
    unbroken = wrap("/" + "a" * 400, face, 300, 2)  # a path with no spaces is broken, not lost
    assert len(unbroken) == 2 and all(face.getlength(line) <= 300 for line in unbroken)
    assert unbroken[0].startswith("/aaa") and unbroken[1].endswith("...")


@pytest.mark.peers
def test_builds_from_series_whose_pixels_cannot_be_read(tmp_path: Path) -> None:
    """JPEG Lossless files with undecodable pixel data: the notice never touches pixels, whole data set or
    header only; and a multi-frame Enhanced MR instance is referenced as a whole."""
    datasets = mr_series(3, size=16)
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = JPEGLossless
        ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream \xff\xd9"])
        ds["PixelData"].VR = "OB"
    paths = write_series(datasets, tmp_path / "jpeg")
    with_study_attributes(paths)
    whole = [pydicom.dcmread(path) for path in paths]
    with pytest.raises(RuntimeError):  # pydicom: every decoder plugin failed (or none is installed)
        _ = whole[0].pixel_array
    for name, sources in (("whole", whole), ("headers", [pydicom.dcmread(p, stop_before_pixels=True) for p in paths])):
        sc, _ = build_not_screened_notice(sources, "codec: JPEG Lossless data could not be decoded", ResultsSection())
        notice = read_back(sc, tmp_path / f"{name}.dcm")
        assert [item.ReferencedSOPInstanceUID for item in notice.ReferencedImageSequence] == [
            ds.SOPInstanceUID for ds in datasets
        ]

    volume = sitk.GetImageFromArray(np.random.default_rng(1).random((4, 16, 16), dtype=np.float32) * 1000)
    enhanced = write_enhanced_mr(volume, tmp_path / "enhanced.dcm", frame_order=[2, 0, 3, 1])
    header = pydicom.dcmread(enhanced, stop_before_pixels=True)
    sc, _ = build_not_screened_notice([header], "quality gate: too few slices (4)", ResultsSection())
    notice = read_back(sc, tmp_path / "enhanced-notice.dcm")
    (item,) = notice.SourceImageSequence
    assert item.ReferencedSOPInstanceUID == header.SOPInstanceUID and "ReferencedFrameNumber" not in item


@pytest.mark.peers
def test_non_ascii_reason_and_latin1_patient_survive_as_utf8(tmp_path: Path) -> None:
    paths, _ = stored_headers(tmp_path / "series", count=2)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jörg"
        ds.save_as(path, enforce_file_format=True)
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    reason = "decoder failed on “Übersicht” → unsupported transfer syntax"
    sc, _ = build_not_screened_notice(sources, reason, ResultsSection())
    notice = read_back(sc, tmp_path / "utf8.dcm")
    assert notice.SpecificCharacterSet == "ISO_IR 192"
    assert str(notice.PatientName) == "Müller^Jörg" and reason in notice.ImageComments


def test_sources_must_be_one_series(tmp_path: Path) -> None:
    _, sources = stored_headers(tmp_path / "series", count=2)
    with pytest.raises(ValueError, match="at least one"):
        build_not_screened_notice([], REASON, ResultsSection())
    other = mr_series(1, study_uid=sources[0].StudyInstanceUID)[0]
    with pytest.raises(ValueError, match="one series"):
        build_not_screened_notice([*sources, other], REASON, ResultsSection())
    sources[1].InstanceNumber = None  # no instance number: after those with one
    sc, _ = build_not_screened_notice([sources[1], sources[0], sources[0]], REASON, ResultsSection())
    assert [item.ReferencedSOPInstanceUID for item in sc.ReferencedImageSequence] == [
        sources[0].SOPInstanceUID,
        sources[1].SOPInstanceUID,
    ]


def test_notice_config_shipped_and_series_number_distinct(tmp_path: Path) -> None:
    shipped = load_config(REPO / "config" / "node.toml").results
    assert shipped.not_screened_notice is True and shipped.notice_series_number == 9904
    assert ResultsSection(not_screened_notice=False).not_screened_notice is False
    for bad in ("notice_series_number = 9901", "notice_series_number = 9903", "not_screened_notice = 3"):
        path = tmp_path / "node.toml"
        path.write_text(f"[results]\n{bad}\n")
        with pytest.raises(Exception, match="results"):
            load_config(path)
