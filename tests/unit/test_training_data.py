"""Training data on real brains: the offline volumes and their cache, a site's folder, augmentation, slices.

The offline brains are preprocessed once per module (~17 s with the tissue maps), the folder's two
scans once more (~12 s); everything after that reads the cache or works on the model grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from models.atlas import Atlas, load_mni152_atlas
from models.data.augment import AugmentConfig, augment_volume
from models.data.sampler import SliceSampler
from models.data.volumes import DataError, TrainingVolume, folder_volumes, offline_volumes
from models.preprocessing import PREPROCESSING_VERSION, Preprocessed, Preprocessor
from models.preprocessing.intensity import LOW_MARGIN, MEDIAN_LEVEL
from tests import brains
from tests.dicom_series import write_mr_series

SHAPE = (50, 96, 96)
# identity warp, and no new anatomy for the synthetic samples
STILL = {"rotation_deg": 0.0, "scale": 0.0, "translation_vox": 0.0, "elastic_vox": 0.0, "anatomy_probability": 0.0}


class Counter:
    """Counts how often the real preprocessing runs (every Preprocessor's): a cache hit must not run it."""

    def __init__(self) -> None:
        self.calls = 0


@pytest.fixture(scope="module")
def counter() -> Iterator[Counter]:
    brains.itk_head()  # skips the module when the Debian data is missing
    count = Counter()
    run = Preprocessor.__call__

    def counted(self: Preprocessor, image: sitk.Image) -> Preprocessed:
        count.calls += 1
        return run(self, image)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Preprocessor, "__call__", counted)
        yield count


@pytest.fixture(scope="module")
def atlas() -> Atlas:
    return load_mni152_atlas()


@pytest.fixture(scope="module")
def preprocessor(atlas: Atlas, counter: Counter) -> Preprocessor:
    return Preprocessor(atlas)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("volume-cache")


@pytest.fixture(scope="module")
def offline(atlas: Atlas, counter: Counter, cache_dir: Path) -> list[TrainingVolume]:
    return offline_volumes(atlas, cache_dir, spm_archive=None)


def tissue_means(image: np.ndarray, tissue: np.ndarray, mask: np.ndarray) -> list[float]:
    """Mean intensity of the voxels mostly (> 0.7) of each class CSF, GM, WM."""
    return [float(image[mask & (tissue[c] > 0.7)].mean()) for c in range(3)]


# --- volumes -----------------------------------------------------------------------------------------------


def test_offline_volumes_are_the_two_training_brains(offline: list[TrainingVolume]) -> None:
    assert [v.name for v in offline] == ["mni152", "itk_head"]  # never Colin27
    for v in offline:
        assert v.contrast == "t1" and v.scaling == PREPROCESSING_VERSION
        assert v.volume.shape == SHAPE and v.volume.dtype == np.float32
        assert v.brain_mask.shape == SHAPE and v.brain_mask.dtype == bool
        assert 0.0 <= v.volume.min() and v.volume.max() <= 1.0
        assert np.all(v.volume[~v.brain_mask] == 0)
        assert v.brain_mask.sum() > 150_000  # ~1.6 L of 8 mL voxels
        assert v.tissue is not None and v.tissue.shape == (3, *SHAPE) and v.tissue.dtype == np.float32


def test_offline_tissue_sums_to_one_and_orders_the_t1(offline: list[TrainingVolume]) -> None:
    for v in offline:
        assert v.tissue is not None
        total = v.tissue.sum(axis=0)
        np.testing.assert_allclose(total[v.brain_mask], 1.0, atol=1e-4)
        assert np.all(total[~v.brain_mask] == 0)
        csf, grey, white = tissue_means(v.volume, v.tissue, v.brain_mask)
        assert white > grey + 0.1 and grey > csf + 0.1, (v.name, csf, grey, white)
        fractions = v.tissue[:, v.brain_mask].mean(axis=1)
        assert np.all((fractions > 0.08) & (fractions < 0.6)), (v.name, fractions)


def test_second_call_reads_the_cache(
    offline: list[TrainingVolume], atlas: Atlas, counter: Counter, cache_dir: Path
) -> None:
    calls = counter.calls
    again = offline_volumes(atlas, cache_dir, spm_archive=None)
    assert counter.calls == calls  # not preprocessed again
    assert len(list(cache_dir.glob("*.npz"))) == 2
    for before, after in zip(offline, again, strict=True):
        np.testing.assert_array_equal(before.volume, after.volume)
        np.testing.assert_array_equal(before.brain_mask, after.brain_mask)
        assert (before.contrast, before.scaling) == (after.contrast, after.scaling)


def test_the_cache_keeps_preprocessing_versions_apart(
    offline: list[TrainingVolume], atlas: Atlas, counter: Counter, cache_dir: Path
) -> None:
    """A version-1 model fine-tuned on the same brains gets them clipped at the 99th percentile, its own scaling."""
    calls = counter.calls
    old = offline_volumes(atlas, cache_dir, version="1", spm_archive=None)
    assert counter.calls == calls + 2  # not the version-2 entries
    for v1, v2 in zip(old, offline, strict=True):
        assert v1.scaling == "1"
        np.testing.assert_array_equal(v1.brain_mask, v2.brain_mask)
        assert np.percentile(v1.volume[v1.brain_mask], 99) == pytest.approx(1.0)
        assert np.median(v2.volume[v2.brain_mask]) == pytest.approx(0.4, abs=0.01)


def test_folder_with_a_nifti_and_a_dicom_series(
    tmp_path: Path, preprocessor: Preprocessor, counter: Counter, cache_dir: Path
) -> None:
    head = brains.itk_head()
    site = tmp_path / "site"
    site.mkdir()
    sitk.WriteImage(head, str(site / "head.nii.gz"))
    write_mr_series(head, site / "patient" / "t1")
    (site / "notes.txt").write_text("not an image")
    volumes = folder_volumes(site, preprocessor, cache_dir)
    assert len(volumes) == 2
    assert sorted(v.name.split("/")[0] for v in volumes) == ["head.nii.gz", "patient"]
    for v in volumes:
        assert v.volume.shape == SHAPE and v.tissue is not None
        csf, grey, white = tissue_means(v.volume, v.tissue, v.brain_mask)
        assert white > grey > csf, (v.name, csf, grey, white)
    calls = counter.calls
    folder_volumes(site, preprocessor, cache_dir)
    assert counter.calls == calls


def test_empty_folder_is_a_data_error(tmp_path: Path, preprocessor: Preprocessor) -> None:
    with pytest.raises(DataError, match="no NIfTI"):
        folder_volumes(tmp_path, preprocessor, tmp_path / "cache")


def test_garbage_nifti_is_a_data_error_naming_it(tmp_path: Path, preprocessor: Preprocessor) -> None:
    (tmp_path / "broken.nii").write_bytes(b"this is not a NIfTI file" * 20)
    with pytest.raises(DataError, match=r"broken\.nii: cannot be read"):
        folder_volumes(tmp_path, preprocessor, tmp_path / "cache")


def test_unpreprocessable_scan_is_a_data_error_naming_it(tmp_path: Path, preprocessor: Preprocessor) -> None:
    sitk.WriteImage(sitk.Image([64, 64, 1], sitk.sitkFloat32), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(DataError, match=r"flat\.nii\.gz: preprocessing failed"):
        folder_volumes(tmp_path, preprocessor, tmp_path / "cache")


# --- augmentation ------------------------------------------------------------------------------------------


def augmented(volume: TrainingVolume, seed: int, contrast: str = "t1", **changes: object) -> tuple[np.ndarray, ...]:
    config = AugmentConfig(**changes)  # type: ignore[arg-type]
    image, mask = augment_volume(volume, config, torch.Generator().manual_seed(seed), contrast)
    assert image.dtype == torch.float32 and mask.dtype == torch.bool and image.shape == SHAPE
    return image.numpy(), mask.numpy()


def test_augmentation_is_deterministic_and_varies_with_the_seed(offline: list[TrainingVolume]) -> None:
    first, first_mask = augmented(offline[0], seed=3)
    again, again_mask = augmented(offline[0], seed=3)
    other, _ = augmented(offline[0], seed=4)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first_mask, again_mask)
    assert np.abs(first - other).mean() > 0.02


def test_augmented_volumes_look_like_preprocessed_ones(offline: list[TrainingVolume]) -> None:
    for seed, volume in enumerate(offline * 3):
        image, mask = augmented(volume, seed, contrast=("t1", "t2", "flair")[seed % 3])
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert np.all(image[~mask] == 0)
        ratio = mask.sum() / volume.brain_mask.sum()
        assert 0.75 < ratio < 1.25, (seed, ratio)
        contrast = ("t1", "t2", "flair")[seed % 3]
        low, median = np.percentile(image[mask], [1, 50])  # the preprocessing's scaling, again
        floor = MEDIAN_LEVEL[contrast] * LOW_MARGIN / (1 + LOW_MARGIN)  # where the 1st percentile lands
        assert low == pytest.approx(floor, abs=0.01) and median == pytest.approx(MEDIAN_LEVEL[contrast], abs=0.01)


def test_synthetic_t1_keeps_the_t1_order_and_t2_reverses_it(offline: list[TrainingVolume]) -> None:
    for volume in offline:
        assert volume.tissue is not None
        t1, mask = augmented(volume, seed=5, synthetic_probability=1.0, **STILL)
        np.testing.assert_array_equal(mask, volume.brain_mask)  # identity warp: tissue still aligned
        csf, grey, white = tissue_means(t1, volume.tissue, mask)
        assert csf < grey < white, (volume.name, csf, grey, white)
        t2, _ = augmented(volume, seed=5, contrast="t2", **STILL)
        csf, grey, white = tissue_means(t2, volume.tissue, mask)
        assert csf > grey > white, (volume.name, csf, grey, white)
        flair, _ = augmented(volume, seed=5, contrast="flair", **STILL)
        csf, grey, white = tissue_means(flair, volume.tissue, mask)
        assert grey > white > csf, (volume.name, csf, grey, white)


# --- slices ------------------------------------------------------------------------------------------------


def sampler(volumes: list[TrainingVolume], augment: bool = True) -> SliceSampler:
    return SliceSampler(volumes, AugmentConfig() if augment else None, seed=11, pool_size=2, refresh_every=3)


def test_batches_resume_exactly_and_differ_between_steps(offline: list[TrainingVolume]) -> None:
    running = sampler(offline)
    for step in range(4):  # through a refresh of every slot
        running.batch(step, 6)
    batch = running.batch(4, 6)
    assert batch.shape == (6, 1, 96, 96) and batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 1
    assert torch.equal(batch, sampler(offline).batch(4, 6))
    assert not torch.equal(batch, running.batch(5, 6))
    brain_fraction = (batch > 0).float().mean(dim=(1, 2, 3))
    assert torch.all(brain_fraction > 0.08)


def test_unaugmented_batches_are_real_slices(offline: list[TrainingVolume]) -> None:
    batch = sampler(offline, augment=False).batch(0, 4)
    real = [torch.from_numpy(v.volume) for v in offline]
    for image in batch[:, 0]:
        assert any(torch.equal(image, slab) for v in real for slab in v)


def test_validation_batches_are_fixed(offline: list[TrainingVolume]) -> None:
    first = sampler(offline)
    validation = first.validation_batches(2, 4)
    training = first.batch(0, 4)
    again = sampler(offline).validation_batches(2, 4)
    assert len(validation) == 2 and validation[0].shape == (4, 1, 96, 96)
    for a, b in zip(validation, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(validation[0], training)
