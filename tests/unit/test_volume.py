"""Series -> volume (node/volume): real brains written as DICOM series in several geometries read back with
their values and exact physical geometry, every slice traced to its source image; series that cannot be
one volume are rejected with a reason that names the problem."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.tag import BaseTag
from pydicom.uid import JPEGLSLossless, generate_uid

from node.volume import SeriesVolume, VolumeRejected, series_to_volume
from tests.brains import colin27, itk_head, mni152_t1
from tests.dicom_series import (
    AXIAL,
    CORONAL,
    ENHANCED_MR_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    SAGITTAL,
    SliceGrid,
    centred_grid,
    resample,
    rotated,
    write_enhanced_mr,
    write_mr_series,
)

GEOMETRY_TOLERANCE = 1e-4


def quantum(image: sitk.Image) -> float:
    """Twice the worst rescale quantisation error of the writer (its slope spreads the range over 60000 steps)."""
    values = sitk.GetArrayViewFromImage(image)
    return float(values.max() - values.min()) / 60000


def assert_reads_back(volume: SeriesVolume, grid: SliceGrid, source: sitk.Image, brain: sitk.Image) -> None:
    """Same grid as written, same values as the resampled source, and the brain itself agrees at the volume's
    physical points (the last holds whatever geometry the writer and reader might share by mistake)."""
    image = volume.image
    assert image.GetPixelID() == sitk.sitkFloat32
    assert image.GetSize() == grid.size
    np.testing.assert_allclose(image.GetOrigin(), grid.origin, atol=GEOMETRY_TOLERANCE)
    np.testing.assert_allclose(image.GetSpacing(), grid.spacing, atol=GEOMETRY_TOLERANCE)
    np.testing.assert_allclose(image.GetDirection(), grid.direction, atol=GEOMETRY_TOLERANCE)
    values = sitk.GetArrayViewFromImage(image)
    np.testing.assert_allclose(values, sitk.GetArrayViewFromImage(source), rtol=0, atol=quantum(source))
    at_same_points = sitk.Resample(brain, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(values, sitk.GetArrayViewFromImage(at_same_points), rtol=0, atol=quantum(source))
    assert values.std() > 0.1 * values.max()  # a brain, not an empty crop


def assert_sources_are_single_frames(volume: SeriesVolume, paths: list[Path]) -> None:
    """slice_sources[k] names the file whose ImagePositionPatient is slice k's first voxel."""
    position = {
        ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient]
        for ds in (pydicom.dcmread(path, stop_before_pixels=True) for path in paths)
    }
    assert len(volume.slice_sources) == len(paths) == len({s.sop_instance_uid for s in volume.slice_sources})
    for k, source in enumerate(volume.slice_sources):
        assert (source.frame_number, source.sop_class_uid) == (None, MR_IMAGE_STORAGE)
        np.testing.assert_allclose(
            position[source.sop_instance_uid], volume.image.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-3
        )


# --- geometries that read back -------------------------------------------------------------------------------


def test_axial_series_at_1x1x3_mm_reads_back_with_exact_geometry(tmp_path: Path) -> None:
    """Slices 2.5 mm thick every 3 mm: the slice spacing comes from the positions, not SliceThickness."""
    brain = mni152_t1()
    grid = centred_grid(brain, AXIAL, (1.0, 1.0, 3.0), (150, 180, 20))
    source = resample(brain, grid)
    paths = write_mr_series(source, tmp_path, slice_thickness=2.5)
    volume = series_to_volume(paths)
    assert_reads_back(volume, grid, source, brain)
    assert_sources_are_single_frames(volume, paths)
    assert volume.series_instance_uid == pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID


def test_sagittal_3d_series_at_1_mm_reads_back(tmp_path: Path) -> None:
    brain = colin27()
    grid = centred_grid(brain, SAGITTAL, (1.0, 1.0, 1.0), (150, 120, 40))
    source = resample(brain, grid)
    paths = write_mr_series(source, tmp_path)
    volume = series_to_volume(paths)
    assert_reads_back(volume, grid, source, brain)
    assert_sources_are_single_frames(volume, paths)


def oblique_head(folder: Path) -> tuple[sitk.Image, SliceGrid, sitk.Image, list[Path]]:
    """The ITK head in axial slices tilted 15 degrees about left-right (as planned along AC-PC), with
    non-square pixels and a non-square matrix so that a swapped row/column axis cannot pass."""
    brain = itk_head()
    grid = centred_grid(brain, rotated(AXIAL, 0, 15.0), (1.8, 2.2, 3.0), (110, 90, 24))
    source = resample(brain, grid)
    return brain, grid, source, write_mr_series(source, folder)


def test_oblique_series_tilted_15_degrees_reads_back(tmp_path: Path) -> None:
    brain, grid, source, paths = oblique_head(tmp_path)
    volume = series_to_volume(paths)
    assert_reads_back(volume, grid, source, brain)
    assert_sources_are_single_frames(volume, paths)


@pytest.mark.parametrize("arrangement", ["reversed", "shuffled", "datasets-shuffled"])
def test_file_order_and_input_kind_change_nothing(tmp_path: Path, arrangement: str) -> None:
    _, _, _, paths = oblique_head(tmp_path)
    expected = series_to_volume(paths)
    instances: list = list(reversed(paths)) if arrangement == "reversed" else random.Random(7).sample(paths, len(paths))
    if arrangement.startswith("datasets"):
        instances = [pydicom.dcmread(path) for path in instances]
    volume = series_to_volume(instances)
    assert volume.slice_sources == expected.slice_sources
    assert volume.image.GetOrigin() == expected.image.GetOrigin()
    assert volume.image.GetDirection() == expected.image.GetDirection()
    np.testing.assert_allclose(volume.image.GetSpacing(), expected.image.GetSpacing(), rtol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(expected.image))


def test_enhanced_mr_multi_frame_reads_back_and_maps_each_slice_to_its_frame(tmp_path: Path) -> None:
    """Coronal, frames stored in shuffled order, orientation and spacing shared, position and rescale per frame."""
    brain = mni152_t1()
    grid = centred_grid(brain, CORONAL, (2.0, 2.0, 2.0), (90, 80, 30))
    source = resample(brain, grid)
    frame_order = random.Random(3).sample(range(30), 30)  # frame j holds slice frame_order[j]
    path = write_enhanced_mr(source, tmp_path / "enhanced.dcm", frame_order=frame_order)
    volume = series_to_volume([path])
    assert_reads_back(volume, grid, source, brain)

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert [s.frame_number for s in volume.slice_sources] == [frame_order.index(k) + 1 for k in range(30)]
    assert {(s.sop_instance_uid, s.sop_class_uid) for s in volume.slice_sources} == {
        (ds.SOPInstanceUID, ENHANCED_MR_IMAGE_STORAGE)
    }
    for k, source_frame in enumerate(volume.slice_sources):
        groups = ds.PerFrameFunctionalGroupsSequence[source_frame.frame_number - 1]
        np.testing.assert_allclose(
            [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient],
            volume.image.TransformIndexToPhysicalPoint((0, 0, k)),
            atol=1e-3,
        )


# --- series that are no volume --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """8 axial slices of the ITK head, 3 mm apart: the series every rejection case bends."""
    brain = itk_head()
    return write_mr_series(
        resample(brain, centred_grid(brain, AXIAL, (2.0, 2.0, 3.0), (48, 40, 8))), tmp_path_factory.mktemp("head")
    )


def test_minimum_slice_count_is_configurable(head_series: list[Path]) -> None:
    with pytest.raises(VolumeRejected, match=r"too few slices: 2, at least 3 needed"):
        series_to_volume(head_series[:2])
    assert series_to_volume(head_series[:2], min_slices=2).image.GetSize()[2] == 2
    with pytest.raises(VolumeRejected, match=r"too few slices: 8, at least 9 needed"):
        series_to_volume(head_series, min_slices=9)


def reject(instances: list) -> str:
    with pytest.raises(VolumeRejected) as caught:
        series_to_volume(instances)
    assert str(caught.value) == caught.value.reason
    return caught.value.reason


def test_a_missing_slice_is_rejected_naming_the_gap(head_series: list[Path]) -> None:
    reason = reject(head_series[:3] + head_series[4:])
    below, above = (pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in head_series[2:5:2])
    assert "missing slice: a gap of 6.00 mm" in reason and "3.00 mm apart" in reason
    assert below in reason and above in reason and "about 1 slice(s) missing" in reason


def tilt_one(series: list[Dataset]) -> list[Dataset]:
    tilted = rotated(AXIAL, 0, 5.0)
    series[5].ImageOrientationPatient = [tilted[0], tilted[3], tilted[6], tilted[1], tilted[4], tilted[7]]
    return series


def second_echo_of_one(series: list[Dataset]) -> list[Dataset]:
    echo = copy.deepcopy(series[3])
    echo.SOPInstanceUID = generate_uid()
    return [*series, echo]


def move_one_along_normal(series: list[Dataset]) -> list[Dataset]:
    series[4].ImagePositionPatient[2] += 0.6  # a fifth of a slice
    return series


def shift_one_in_plane(series: list[Dataset]) -> list[Dataset]:
    series[4].ImagePositionPatient[0] += 2.0  # one pixel
    return series


def shrink_one(series: list[Dataset]) -> list[Dataset]:
    series[2].Rows = 20
    series[2].PixelData = series[2].PixelData[: len(series[2].PixelData) // 2]
    return series


def respace_one(series: list[Dataset]) -> list[Dataset]:
    series[2].PixelSpacing = [2.0, 2.1]
    return series


def drop(keyword: str) -> Callable[[list[Dataset]], list[Dataset]]:
    def mutate(series: list[Dataset]) -> list[Dataset]:
        del series[6][keyword]
        return series

    return mutate


def garble_position(series: list[Dataset]) -> list[Dataset]:
    series[1].ImagePositionPatient = [1.0, 2.0]
    return series


def compress_one(series: list[Dataset]) -> list[Dataset]:
    """JPEG-LS bytes that no decoder accepts: without a JPEG-LS decoder or with one, the pixels are unreadable."""
    series[3].file_meta.TransferSyntaxUID = JPEGLSLossless
    series[3].PixelData = encapsulate([b"\xff\xd8 not a JPEG-LS stream "])
    return series


def mix_series(series: list[Dataset]) -> list[Dataset]:
    series[0].SeriesInstanceUID = generate_uid()
    return series


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(tilt_one, "mixed orientations: 1 of 8 frames are not parallel", id="mixed-orientation"),
        pytest.param(second_echo_of_one, "duplicate position", id="duplicate-position"),
        pytest.param(move_one_along_normal, "uneven slice spacing", id="uneven-spacing"),
        pytest.param(shift_one_in_plane, "shifted within their plane", id="sheared-stack"),
        pytest.param(shrink_one, "mixed image sizes (rows x columns): 20x48, 40x48", id="mixed-rows"),
        pytest.param(respace_one, "mixed pixel spacing", id="mixed-pixel-spacing"),
        pytest.param(drop("ImagePositionPatient"), "has no ImagePositionPatient", id="no-position"),
        pytest.param(drop("ImageOrientationPatient"), "has no ImageOrientationPatient", id="no-orientation"),
        pytest.param(drop("PixelSpacing"), "has no PixelSpacing", id="no-pixel-spacing"),
        pytest.param(garble_position, "malformed ImagePositionPatient", id="malformed-position"),
        pytest.param(compress_one, "cannot be read (JPEG-LS Lossless Image Compression)", id="undecodable-pixels"),
        pytest.param(mix_series, "belong to 2 series", id="two-series"),
    ],
)
def test_series_that_are_no_volume_are_rejected_with_the_reason(
    head_series: list[Path], mutate: Callable[[list[Dataset]], list[Dataset]], expected: str
) -> None:
    reason = reject(mutate([pydicom.dcmread(path) for path in head_series]))
    assert expected in reason


def test_truncated_pixel_data_is_rejected(head_series: list[Path], tmp_path: Path) -> None:
    """A file cut short inside its pixel data (a half-written copy) still has a readable header."""
    cut = tmp_path / head_series[4].name
    cut.write_bytes(head_series[4].read_bytes()[:-1000])
    uid = pydicom.dcmread(cut, stop_before_pixels=True).SOPInstanceUID
    reason = reject([*head_series[:4], cut, *head_series[5:]])
    assert f"the pixel data of instance {uid} cannot be read" in reason


def test_a_file_that_is_not_dicom_is_rejected(head_series: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM at all" * 20)
    assert "junk.dcm is not a readable DICOM file" in reject([*head_series, junk])


def test_enhanced_mr_without_frame_positions_is_rejected(tmp_path: Path) -> None:
    brain = itk_head()
    path = write_enhanced_mr(
        resample(brain, centred_grid(brain, AXIAL, (4.0, 4.0, 4.0), (24, 24, 6))), tmp_path / "e.dcm"
    )
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    assert f"instance {ds.SOPInstanceUID} frame 3 has no PlanePositionSequence" in reject([ds])


def elements(ds: Dataset) -> Iterator[tuple[Dataset, BaseTag]]:
    """Every element of ``ds`` and of its sequence items, as (the data set holding it, its tag)."""
    for element in ds:
        yield ds, element.tag
        if element.VR == "SQ":
            for item in element.value:
                yield from elements(item)


def test_whatever_attribute_is_missing_the_answer_is_a_volume_or_a_reason(
    head_series: list[Path], tmp_path: Path
) -> None:
    """Never a crash: every attribute of one slice, and every attribute at any depth of an Enhanced MR file,
    deleted in turn."""
    rest = [pydicom.dcmread(path) for path in head_series[1:]]
    brain = itk_head()
    enhanced = resample(brain, centred_grid(brain, AXIAL, (4.0, 4.0, 4.0), (24, 20, 4)))
    cases = [
        (pydicom.dcmread(head_series[0]), rest),
        (pydicom.dcmread(write_enhanced_mr(enhanced, tmp_path / "enhanced.dcm")), []),
    ]
    rejected = 0
    for broken, others in cases:
        for n, (_, tag) in enumerate(elements(broken)):
            damaged = copy.deepcopy(broken)
            holder, _ = list(elements(damaged))[n]
            del holder[tag]
            try:
                series_to_volume([damaged, *others])
            except VolumeRejected:
                rejected += 1
            except Exception as exc:  # anything but a reason is the failure this test looks for
                pytest.fail(f"deleting {keyword_for_tag(tag) or tag} raised {exc!r}")
    assert rejected >= 10
