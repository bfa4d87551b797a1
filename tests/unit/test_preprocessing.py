"""Preprocessing on real brains: registration accuracy, brain masks against ground truth, the round trip
to the model grid and back, and the model-grid volume itself.

The full preprocessing runs once per head (module fixtures), ~5 s each on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from models.atlas import Atlas, load_mni152_atlas
from models.preprocessing import (
    Grid,
    Preprocessed,
    PreprocessingError,
    Preprocessor,
    to_input_grid,
    to_model_grid,
)
from models.preprocessing.intensity import LOW_MARGIN, MEDIAN_LEVEL
from models.preprocessing.registration import register_to_atlas, registration_target
from tests import brains


@pytest.fixture(scope="module")
def atlas() -> Atlas:
    return load_mni152_atlas()


@pytest.fixture(scope="module")
def preprocessor(atlas: Atlas) -> Preprocessor:
    return Preprocessor(atlas)


@pytest.fixture(scope="module")
def colin_head() -> sitk.Image:
    return brains.colin27(skull=True)


@pytest.fixture(scope="module")
def colin_prepared(preprocessor: Preprocessor, colin_head: sitk.Image) -> Preprocessed:
    return preprocessor(colin_head)


@pytest.fixture(scope="module")
def itk_prepared(preprocessor: Preprocessor) -> Preprocessed:
    return preprocessor(brains.itk_head())


def dice(a: sitk.Image, b: sitk.Image) -> float:
    x = sitk.GetArrayFromImage(a) > 0  # copies, not views: the images may be temporaries
    y = sitk.GetArrayFromImage(b) > 0
    return float(2 * (x & y).sum() / (x.sum() + y.sum()))


def physical_points(image: sitk.Image, every: int) -> np.ndarray:
    """Physical coordinates of every ``every``-th nonzero voxel of ``image``, one row each."""
    index = np.argwhere(sitk.GetArrayFromImage(image) > 0)[::every, ::-1].astype(float)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (index * np.array(image.GetSpacing())) @ direction.T


def moved(image: sitk.Image, affine: sitk.AffineTransform, pad: int = 20) -> sitk.Image:
    """``image`` resampled through ``affine`` (output point -> image point) on its grid grown by ``pad``."""
    grid = sitk.Image([n + 2 * pad for n in image.GetSize()], sitk.sitkFloat32)
    grid.SetSpacing(image.GetSpacing())
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin(image.TransformIndexToPhysicalPoint([-pad] * 3))
    return sitk.Resample(image, grid, affine, sitk.sitkLinear, 0.0)


def known_affine(image: sitk.Image) -> sitk.AffineTransform:
    """10 degrees about an oblique axis, 8 mm, 5 % larger, about the image centre."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    rotation = np.array(sitk.VersorTransform((1.0, 1.0, 0.5), np.deg2rad(10)).GetMatrix()).reshape(3, 3)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    affine.SetMatrix(tuple((rotation * 1.05).ravel()))
    affine.SetTranslation(tuple(np.full(3, 8 / np.sqrt(3))))
    return affine


def mean_distance(a: sitk.Transform, b: sitk.Transform, points: np.ndarray) -> float:
    return float(np.mean([np.linalg.norm(np.subtract(a.TransformPoint(p), b.TransformPoint(p))) for p in points]))


def sphere(like: sitk.Image, centre: np.ndarray, radius_mm: float) -> sitk.Image:
    """A uint8 ball on the grid of ``like``."""
    index = np.indices(like.GetSize()[::-1]).reshape(3, -1)[::-1].T.astype(float)
    direction = np.array(like.GetDirection()).reshape(3, 3)
    points = np.array(like.GetOrigin()) + (index * np.array(like.GetSpacing())) @ direction.T
    inside = np.linalg.norm(points - centre, axis=1) <= radius_mm
    ball = sitk.GetImageFromArray(inside.reshape(like.GetSize()[::-1]).astype(np.uint8))
    ball.CopyInformation(like)
    return ball


def centroid(mask: sitk.Image) -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    return np.array(stats.GetCentroid(1))


# --- registration --------------------------------------------------------------------------------


def test_registration_recovers_a_known_affine_of_colin27(atlas: Atlas) -> None:
    """Colin27 (another brain than the atlas) and the same brain moved by a known affine: the two
    registrations must differ by exactly that affine."""
    target = registration_target(atlas)
    colin = brains.colin27(skull=False)
    shift = known_affine(colin)  # moved point -> original point
    to_colin = register_to_atlas(colin, target)
    to_moved = register_to_atlas(moved(colin, shift), target)

    truth = sitk.CompositeTransform([shift.GetInverse(), to_colin])  # applied last to first: atlas -> moved
    points = physical_points(atlas.brain_mask, every=97)
    error = mean_distance(to_moved, truth, points)
    print(f"Colin27 moved by a known affine: mean error {error:.2f} mm over the brain")
    assert error < 2.0
    # Colin27 lives in MNI space already: its own registration stays near the identity.
    assert mean_distance(to_colin, sitk.Transform(), points) < 4.0


def test_registration_recovers_a_known_affine_of_the_atlas_itself(atlas: Atlas) -> None:
    """The truth is exact here: the moved template must come back as the inverse of the move."""
    shift = known_affine(atlas.image)
    recovered = register_to_atlas(moved(atlas.image, shift), registration_target(atlas))
    error = mean_distance(recovered, shift.GetInverse(), physical_points(atlas.brain_mask, every=97))
    print(f"MNI152 moved by a known affine: mean error {error:.2f} mm over the brain")
    assert error < 2.0


# --- brain mask ------------------------------------------------------------------------------------


def test_brain_mask_of_colin27_with_skull_matches_its_ground_truth(colin_prepared: Preprocessed) -> None:
    value = dice(colin_prepared.input_brain_mask, brains.colin27_brain_mask())
    print(f"Colin27 brain mask Dice {value:.3f}")
    assert value >= 0.90


def test_brain_mask_of_the_itk_head_matches_its_ground_truth(itk_prepared: Preprocessed) -> None:
    value = dice(itk_prepared.input_brain_mask, brains.itk_head_brain_mask())
    print(f"ITK head brain mask Dice {value:.3f}")
    assert value >= 0.90


# --- model grid and back ---------------------------------------------------------------------------


def test_a_blob_survives_the_round_trip_to_the_model_grid(colin_prepared: Preprocessed, colin_head: sitk.Image) -> None:
    centre = np.array(colin_prepared.atlas_to_input.TransformPoint((25.0, 10.0, 20.0)))  # left parietal white matter
    blob = sphere(colin_head, centre, radius_mm=15.0)
    on_model = to_model_grid(blob, colin_prepared, "linear") >= 0.5
    back = to_input_grid(on_model, colin_prepared, "nearest")

    assert Grid.of(back) == Grid.of(colin_head)
    assert back.GetPixelID() == sitk.sitkUInt8
    value = dice(back, blob)
    shift = float(np.linalg.norm(centroid(back) - centroid(blob)))
    print(f"blob round trip: Dice {value:.3f}, centroid moved {shift:.2f} mm")
    assert value >= 0.90
    assert shift <= 2.0


def test_scores_come_back_on_exactly_the_input_grid(itk_prepared: Preprocessed) -> None:
    """The ITK head is 2x2x3 mm with a coronal-style direction matrix: nothing about its grid is default."""
    scores = np.random.default_rng(0).random(itk_prepared.geometry.model.shape, dtype=np.float32)
    back = to_input_grid(scores, itk_prepared, "linear")
    head = brains.itk_head()
    assert Grid.of(back) == Grid.of(head)
    assert back.GetPixelID() == sitk.sitkFloat32
    values = sitk.GetArrayViewFromImage(back)
    assert 0.0 <= values.min() and values.max() <= 1.0
    # Inside the brain and the slab the model grid covers, every voxel gets a score.
    covered = to_input_grid(np.ones(itk_prepared.geometry.model.shape, np.uint8), itk_prepared, "nearest")
    brain = sitk.GetArrayViewFromImage(itk_prepared.input_brain_mask) > 0
    inside = brain & (sitk.GetArrayViewFromImage(covered) > 0)
    assert (values[inside] > 0).mean() > 0.99


def test_the_volume_on_the_model_grid(colin_prepared: Preprocessed) -> None:
    volume, mask = colin_prepared.volume, colin_prepared.brain_mask
    assert colin_prepared.geometry.model.size == (96, 96, 50)
    assert colin_prepared.geometry.model.spacing == (2.0, 2.0, 2.0)
    assert volume.shape == mask.shape == (50, 96, 96)
    assert volume.dtype == np.float32 and mask.dtype == bool
    assert volume.min() == 0.0 and volume.max() < 1.0  # version 2 compresses the top, never clips it
    assert np.all(volume[~mask] == 0.0)
    # The brain's median went to the T1 level and its 1st percentile a little above 0 (the floor is below it).
    floor = MEDIAN_LEVEL["t1"] * LOW_MARGIN / (1 + LOW_MARGIN)
    assert np.percentile(volume[mask], 1) == pytest.approx(floor, abs=1e-3)
    assert np.median(volume[mask]) == pytest.approx(MEDIAN_LEVEL["t1"], abs=1e-3)
    # An adult brain in a 100 mm slab at 2 mm: some 1.3-1.8 L of it.
    assert 1300 < mask.sum() * 8 / 1000 < 1800


def test_preprocessing_is_deterministic(
    preprocessor: Preprocessor, colin_head: sitk.Image, colin_prepared: Preprocessed
) -> None:
    again = preprocessor(colin_head)
    assert np.array_equal(again.volume, colin_prepared.volume)
    assert np.array_equal(again.brain_mask, colin_prepared.brain_mask)
    assert again.atlas_to_input.GetParameters() == colin_prepared.atlas_to_input.GetParameters()


def test_the_crop_box_holds_the_atlas_brain_left_right_and_front_back(atlas: Atlas, preprocessor: Preprocessor) -> None:
    """And the 100 mm slab most of it top to bottom (the model_grid module says which part is left out)."""
    points = physical_points(atlas.brain_mask, every=1)
    crop = preprocessor.geometry.crop
    low = np.array(crop.origin) - 0.5
    high = low + np.array(crop.size)
    assert np.all(points[:, :2] >= low[:2]) and np.all(points[:, :2] <= high[:2])
    in_slab = (points[:, 2] >= low[2]) & (points[:, 2] <= high[2])
    assert 0.85 < in_slab.mean() < 0.9
    assert crop.origin[2] == -38.0  # MNI z -38 to +61: the densest 100 mm


def test_a_2d_image_is_refused(preprocessor: Preprocessor) -> None:
    with pytest.raises(PreprocessingError, match="3D scalar image"):
        preprocessor(sitk.Image(64, 64, sitk.sitkFloat32))
