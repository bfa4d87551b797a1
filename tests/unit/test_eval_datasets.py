"""Finding and reading labelled datasets (models/evaluation/datasets.py) in each layout, on datasets written by
``tests.eval_datasets`` from Colin27 with simulated lesions: ids, labels on the image grid where the lesion
was written, and a one-line DatasetError naming the file for each broken case.

Each dataset is written once per module (~1 s each); broken variants copy one case of it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from models.evaluation.datasets import DatasetCase, DatasetError, find_dataset, find_healthy, load_case
from node.demo.series_writer import write_mr_series
from tests import brains
from tests.eval_datasets import write_brats, write_dicom, write_healthy, write_pairs


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    brains.colin27(skull=True)  # skips the module when the Debian data is missing
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def brats(datasets: Path) -> Path:
    return write_brats(datasets / "brats", 2)


@pytest.fixture(scope="module")
def pairs(datasets: Path) -> Path:
    return write_pairs(datasets / "pairs", 3)


@pytest.fixture(scope="module")
def dicom(datasets: Path) -> Path:
    return write_dicom(datasets / "dicom", 2)


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def assert_on_grid(label: sitk.Image, image: sitk.Image) -> None:
    assert label.GetPixelID() == sitk.sitkUInt8
    assert (label.GetSize(), label.GetSpacing()) == (image.GetSize(), image.GetSpacing())
    assert (label.GetOrigin(), label.GetDirection()) == (image.GetOrigin(), image.GetDirection())
    assert set(np.unique(array(label))) == {0, 1}


# --- layouts -------------------------------------------------------------------------------------------


def test_brats_cases_are_found_and_the_modality_picks_the_image(brats: Path) -> None:
    layout, cases = find_dataset(brats)
    assert layout == "brats" and [c.id for c in cases] == ["BraTS2021_00000", "BraTS2021_00001"]
    case = cases[0]
    assert case.image == (brats / case.id / f"{case.id}_t1.nii.gz",)
    assert case.label == brats / case.id / f"{case.id}_seg.nii.gz" and case.layout == "brats"
    _, flair = find_dataset(brats, "brats", modality="flair")
    assert flair[0].image == (brats / case.id / f"{case.id}_flair.nii.gz",) and flair[0].label == case.label

    image, label = load_case(case)
    assert label is not None
    assert_on_grid(label, image)
    written = array(sitk.ReadImage(str(case.label)))
    assert set(np.unique(written)) == {0, 1, 2, 4}  # BraTS label values: every non-zero one is lesion
    np.testing.assert_array_equal(array(label), written != 0)
    assert np.all(array(image)[array(label) == 1] > 0)  # the lesion lies in the skull-stripped brain
    assert array(label).sum() * 8e-3 > 1  # mL of 2 mm voxels


def test_brats_t2_and_flair_keep_their_tissue_order(brats: Path) -> None:
    """CSF > GM > WM on T2 and GM > WM > CSF on FLAIR: what the quality gate checks for those models."""
    t1 = array(load_case(find_dataset(brats, modality="t1")[1][0])[0])
    t2 = array(load_case(find_dataset(brats, modality="t2")[1][0])[0])
    flair = array(load_case(find_dataset(brats, modality="flair")[1][0])[0])
    brain = t1 > 0
    dark, mid, bright = np.percentile(t1[brain], [5, 50, 95])  # CSF-ish, GM/WM border, WM-ish
    for_t1 = {"csf": t1 <= dark, "wm": t1 >= bright}
    assert t2[brain & for_t1["csf"]].mean() > t2[brain & for_t1["wm"]].mean()
    assert flair[brain & for_t1["wm"]].mean() > flair[brain & for_t1["csf"]].mean()


def test_pairs_cases_are_found_and_labels_are_the_files_written(pairs: Path) -> None:
    layout, cases = find_dataset(pairs)
    assert layout == "pairs" and [c.id for c in cases] == ["case-000", "case-001", "case-002"]
    assert find_dataset(pairs, "pairs")[1] == cases
    for case in cases:
        assert case.image == (pairs / "images" / f"{case.id}.nii.gz",)
        assert case.label == pairs / "labels" / f"{case.id}.nii.gz"
    image, label = load_case(cases[1])
    assert label is not None
    assert_on_grid(label, image)
    np.testing.assert_array_equal(array(label), array(sitk.ReadImage(str(cases[1].label))))


def test_pairs_strip_the_nnunet_channel_suffix_and_read_other_formats(tmp_path: Path) -> None:
    folder = write_pairs(tmp_path / "nnunet", 1, suffix=".mha")
    image = folder / "images" / "case-000.mha"
    image.rename(folder / "images" / "case-000_0000.mha")
    shutil.copy(folder / "images" / "case-000_0000.mha", folder / "images" / "case-000_0001.mha")  # a 2nd channel
    layout, [case] = find_dataset(folder)
    assert layout == "pairs" and case.id == "case-000" and case.image[0].name == "case-000_0000.mha"
    assert case.label == folder / "labels" / "case-000.mha"
    assert load_case(case)[1] is not None


def test_dicom_cases_map_the_seg_through_its_references(dicom: Path) -> None:
    """The loaded label equals the SEG decoded independently: frame by frame onto the instance it references,
    at that instance's InstanceNumber (the slice it was written as). The SEG leaves out lesion-free slices."""
    layout, cases = find_dataset(dicom)
    assert layout == "dicom" and [c.id for c in cases] == ["case-000", "case-001"]
    for case in cases:
        assert case.label == dicom / case.id / "segmentation.dcm" and len(case.image) == 90
        image, label = load_case(case)
        assert label is not None
        assert_on_grid(label, image)
        np.testing.assert_array_equal(array(label), decoded_seg(case))
        assert array(label).sum() * 8e-3 > 1


def decoded_seg(case: DatasetCase) -> np.ndarray:
    assert case.label is not None
    slice_of = {}
    for path in case.image:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        slice_of[ds.SOPInstanceUID] = int(ds.InstanceNumber) - 1
    seg = pydicom.dcmread(case.label)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    assert 0 < len(frames) < len(case.image)  # empty frames omitted
    expected = np.zeros((len(case.image), seg.Rows, seg.Columns), dtype=np.uint8)
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        expected[slice_of[uid]] = frame
    return expected


def test_explicit_layout_with_no_cases_says_what_it_looked_for(pairs: Path) -> None:
    with pytest.raises(DatasetError, match=r"no brats cases found \(looked for case folders"):
        find_dataset(pairs, "brats")
    with pytest.raises(DatasetError, match="unknown layout 'nifti'"):
        find_dataset(pairs, "nifti")
    with pytest.raises(DatasetError, match="unknown modality 't1ce'"):
        find_dataset(pairs, modality="t1ce")


def test_an_empty_folder_says_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no dataset found .*brats.*pairs.*dicom"):
        find_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        find_dataset(tmp_path / "absent")


def test_an_ambiguous_folder_lists_what_it_found(tmp_path: Path) -> None:
    for name in ("c1/c1_t1.nii.gz", "c1/c1_seg.nii.gz", "c2/c2_flair.nii.gz", "images/a.nii.gz", "labels/a.nii.gz"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    with pytest.raises(DatasetError, match=r"found 2 brats-style case folders and an images/labels pair; choose"):
        find_dataset(tmp_path)
    assert find_dataset(tmp_path, "pairs")[0] == "pairs"  # an explicit layout settles it


# --- broken cases ----------------------------------------------------------------------------------------


def copy_case(pairs: Path, tmp_path: Path, case_id: str = "case-000") -> Path:
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
        shutil.copy(pairs / sub / f"{case_id}.nii.gz", tmp_path / sub)
    return tmp_path


def test_a_missing_label_is_a_case_error_naming_the_file(pairs: Path, tmp_path: Path) -> None:
    folder = copy_case(pairs, tmp_path)
    (folder / "labels" / "case-000.nii.gz").unlink()
    [case] = find_dataset(folder)[1]
    with pytest.raises(DatasetError, match=r"labels/case-000\.nii\.gz: missing"):
        load_case(case)


def test_a_label_on_another_grid_is_refused(pairs: Path, tmp_path: Path) -> None:
    folder = copy_case(pairs, tmp_path)
    path = folder / "labels" / "case-000.nii.gz"
    label = sitk.ReadImage(str(path))
    label.SetOrigin([x + 1.0 for x in label.GetOrigin()])
    sitk.WriteImage(label, str(path))
    with pytest.raises(DatasetError, match=r"case-000\.nii\.gz: the label's grid is not the image's \(origin"):
        load_case(find_dataset(folder)[1][0])
    sitk.WriteImage(sitk.Shrink(label, [2, 2, 2]), str(path))
    with pytest.raises(DatasetError, match=r"grid is not the image's \(size"):
        load_case(find_dataset(folder)[1][0])


def test_a_corrupt_image_or_a_4d_image_is_refused_naming_it(pairs: Path, tmp_path: Path) -> None:
    folder = copy_case(pairs, tmp_path)
    image = folder / "images" / "case-000.nii.gz"
    image.write_bytes(b"not a NIfTI file")
    with pytest.raises(DatasetError, match=r"images/case-000\.nii\.gz: cannot be read as an image"):
        load_case(find_dataset(folder)[1][0])
    volume = sitk.Image([4, 4, 4], sitk.sitkFloat32)
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(image))
    with pytest.raises(DatasetError, match=r"case-000\.nii\.gz: a 4D image .* one 3D greyscale volume"):
        load_case(find_dataset(folder)[1][0])


def copy_dicom_case(dicom: Path, tmp_path: Path) -> Path:
    shutil.copytree(dicom / "case-000", tmp_path / "case-000")
    return tmp_path


def test_the_seg_picks_its_series_and_one_that_references_another_is_refused(dicom: Path, tmp_path: Path) -> None:
    folder = copy_dicom_case(dicom, tmp_path)
    [case] = find_dataset(folder)[1]
    image = load_case(case)[0]
    write_mr_series(image, folder / "case-000" / "other")  # the same pixels under new UIDs, beside the first
    assert find_dataset(folder)[1] == [case]  # the series the SEG references
    for path in case.image:
        path.unlink()
    with pytest.raises(DatasetError, match=r"segmentation\.dcm: the SEG references no image of the series"):
        load_case(find_dataset(folder)[1][0])


def test_a_broken_seg_or_a_case_without_one_is_refused_naming_it(dicom: Path, tmp_path: Path) -> None:
    folder = copy_dicom_case(dicom, tmp_path)
    path = folder / "case-000" / "segmentation.dcm"
    seg = pydicom.dcmread(path)
    del seg.SegmentSequence
    seg.save_as(path)
    [case] = find_dataset(folder)[1]
    with pytest.raises(DatasetError, match=r"segmentation\.dcm: not a readable DICOM SEG \(.*SegmentSequence"):
        load_case(case)
    path.write_bytes(path.read_bytes()[:2000])  # truncated: GDCM finds no series in it
    with pytest.raises(DatasetError, match=r"case-000: segmentation\.dcm: not a readable DICOM image"):
        load_case(find_dataset(folder)[1][0])
    path.unlink()
    [case] = find_dataset(folder)[1]
    assert case.id == "case-000" and len(case.image) == 90
    with pytest.raises(DatasetError, match=r"case-000: 0 DICOM SEG files; a case needs exactly one"):
        load_case(case)


# --- healthy scans ---------------------------------------------------------------------------------------


def test_find_healthy_finds_image_files_and_dicom_series(tmp_path: Path) -> None:
    write_healthy(tmp_path / "scans", 2, skull=False)
    write_healthy(tmp_path / "scans" / "site", 1, dicom=True)
    cases = find_healthy(tmp_path / "scans")
    assert [c.id for c in cases] == ["healthy-000", "healthy-001", "site/healthy-000"]
    assert {c.layout for c in cases} == {"healthy"} and all(c.label is None for c in cases)
    assert len(cases[2].image) == 90
    files, series = load_case(cases[0]), load_case(cases[2])
    assert files[1] is None and series[1] is None
    assert files[0].GetSize() == series[0].GetSize() == (90, 108, 90)
    assert array(files[0]).min() == 0 and array(series[0]).max() > 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no NIfTI, MHA, NRRD or DICOM series found"):
        find_healthy(tmp_path / "empty")
