"""The demo's sample study: real DICOM that the node's selection treats as a scanner's T1 plus a localizer,
with a lesion of known size and place inside the T1 series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from models.data import brains
from node.demo.study import PATIENT_ID, PATIENT_NAME, SampleStudy, build_sample_study
from node.selection import Contrast, SelectionSection, group_by_series, read_headers, select_series

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    return build_sample_study(tmp_path_factory.mktemp("sample"), seed=0)


def t1_volume(study: SampleStudy) -> sitk.Image:
    """The T1 series as SimpleITK reads it (sorted along the slice normal by GDCM)."""
    folder = study.files[0].parent  # the T1 series is written first, into a folder of its own
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), study.t1_series_uid))
    return reader.Execute()


def test_two_series_in_one_study_of_a_fake_patient(sample: SampleStudy) -> None:
    headers = read_headers(sample.files)
    assert all(path.is_file() for path in sample.files)
    assert {str(ds.StudyInstanceUID) for ds in headers} == {sample.study_uid}
    assert {str(ds.SOPClassUID) for ds in headers} == {MR_IMAGE_STORAGE}
    assert {(str(ds.PatientName), str(ds.PatientID)) for ds in headers} == {(PATIENT_NAME, PATIENT_ID)}
    series = {s.series_uid: s for s in group_by_series(headers)}
    assert set(series) == {sample.t1_series_uid, sample.localizer_series_uid}
    assert len(series[sample.t1_series_uid].instances) == 75
    assert len(series[sample.localizer_series_uid].instances) == 3
    assert len({str(ds.SOPInstanceUID) for ds in headers}) == len(sample.files)
    ds = pydicom.dcmread(sample.files[0])  # a full Part 10 file, pixels and rescale included
    assert ds.file_meta.MediaStorageSOPClassUID == MR_IMAGE_STORAGE
    assert ds.pixel_array.dtype == np.int16 and "RescaleSlope" in ds


def test_the_node_selects_the_t1_and_skips_the_localizer(sample: SampleStudy) -> None:
    decisions = {
        series.series_uid: select_series(series, SelectionSection())
        for series in group_by_series(read_headers(sample.files))
    }
    t1, localizer = decisions[sample.t1_series_uid], decisions[sample.localizer_series_uid]
    assert t1.selected and t1.contrast == Contrast.T1, t1.reason
    assert not localizer.selected and "localizer" in localizer.reason.lower(), localizer.reason


def test_the_t1_timing_alone_reads_as_t1(sample: SampleStudy) -> None:
    """A site that renames its protocols still gets the demo's T1 classified by TR, TE and TI."""
    headers = [ds for ds in read_headers(sample.files) if ds.SeriesInstanceUID == sample.t1_series_uid]
    for ds in headers:
        del ds.SeriesDescription, ds.ProtocolName
    [series] = group_by_series(headers)
    decision = select_series(series, SelectionSection())
    assert decision.selected and decision.contrast == Contrast.T1
    assert "inversion-recovery" in decision.reason


def test_the_lesion_lies_in_the_t1_series_and_darkens_it(sample: SampleStudy) -> None:
    assert sample.brain in {"Colin27", "MNI152"}
    assert (sample.lesion_kind, sample.lesion_polarity) == ("tumour", "dark")
    assert 1.0 < sample.lesion_volume_ml < 150.0
    volume = t1_volume(sample)
    assert volume.GetSize() == (150, 176, 75)
    index = volume.TransformPhysicalPointToContinuousIndex(sample.lesion_centre_lps)
    assert all(0 <= i <= n - 1 for i, n in zip(index, volume.GetSize(), strict=True)), index

    # The same point of the brain without the lesion is brighter: the lesion is really in the pixels.
    brain = brains.colin27(skull=True) if sample.brain == "Colin27" else brains.mni152_t1()
    healthy = sitk.Resample(brain, volume, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    centre = tuple(round(i) for i in index)
    near = tuple(slice(c - 1, c + 2) for c in centre[::-1])  # (z, y, x)
    lesioned = sitk.GetArrayViewFromImage(sitk.Cast(volume, sitk.sitkFloat32))[near].mean()
    unchanged = sitk.GetArrayViewFromImage(healthy)[near].mean()
    assert lesioned < 0.8 * unchanged, (lesioned, unchanged)
    assert sample.lesion.startswith("dark tumour") and "mL" in sample.lesion


def test_each_build_is_a_new_study_with_the_same_lesion(sample: SampleStudy, tmp_path: Path) -> None:
    again = build_sample_study(tmp_path, seed=0)
    assert {again.study_uid, again.t1_series_uid, again.localizer_series_uid}.isdisjoint(
        {sample.study_uid, sample.t1_series_uid, sample.localizer_series_uid}
    )
    sop_uids = {str(ds.SOPInstanceUID) for ds in read_headers(sample.files)}
    assert sop_uids.isdisjoint(str(ds.SOPInstanceUID) for ds in read_headers(again.files))
    assert again.lesion_volume_ml == pytest.approx(sample.lesion_volume_ml)
    assert again.lesion_centre_lps == pytest.approx(sample.lesion_centre_lps)


def test_without_colin27_the_study_uses_the_mni152_template(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fresh machine without Debian's mricron-data still gets a sample study (nilearn ships MNI152)."""
    monkeypatch.setattr(brains, "COLIN27_HEAD", tmp_path / "absent.nii.gz")
    study = build_sample_study(tmp_path / "study", seed=1)
    assert study.brain == "MNI152" and study.lesion_volume_ml > 1.0
    [t1] = [s for s in group_by_series(read_headers(study.files)) if s.series_uid == study.t1_series_uid]
    assert select_series(t1, SelectionSection()).selected
    index = t1_volume(study).TransformPhysicalPointToContinuousIndex(study.lesion_centre_lps)
    assert all(0 <= i <= n - 1 for i, n in zip(index, (150, 176, 75), strict=True)), index
