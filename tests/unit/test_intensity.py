"""Intensity scaling (models/preprocessing/intensity.py): version 2 keeps what version 1 clipped."""

from __future__ import annotations

import numpy as np
import pytest

from models.preprocessing.errors import PreprocessingError
from models.preprocessing.intensity import KNEE, MEDIAN_LEVEL, normalise, soft_knee


def t1_brain_with_a_bright_lesion() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A T1-like brain (CSF 100, GM 300, WM 450, noise) with a 3 % lesion at 1.4x white matter."""
    rng = np.random.default_rng(0)
    shape = (20, 40, 40)
    levels = rng.choice([100.0, 300.0, 450.0], size=shape, p=[0.15, 0.45, 0.40])
    volume = (levels + rng.normal(0, 10, shape)).astype(np.float32)
    brain = np.ones(shape, bool)
    brain[:, :2] = False
    lesion = np.zeros(shape, bool)
    lesion[8:12, 15:25, 15:27] = True
    volume[lesion] = 630.0
    return volume, brain, lesion


def test_version_1_clips_a_bright_lesion_to_white_matter_and_version_2_keeps_it_brighter() -> None:
    volume, brain, lesion = t1_brain_with_a_bright_lesion()
    white = brain & ~lesion & (np.abs(volume - 450) < 30)
    old = normalise(volume, brain, "1")
    assert np.all(old[lesion] == 1.0)  # clipped flat: no contrast inside the lesion
    new = normalise(volume, brain, "2", "t1")
    assert new[lesion].min() > new[white].max() + 0.1  # still brighter than any white matter
    assert new.max() < 1.0 and np.median(new[brain]) == pytest.approx(MEDIAN_LEVEL["t1"], abs=0.01)
    assert np.all(new[~brain] == 0) and new.min() == 0.0


def test_the_lesion_hardly_moves_the_scale_of_healthy_tissue() -> None:
    """The 99th percentile (version 1) lands inside a 3 % lesion and darkens the whole brain; the median does not."""
    volume, brain, lesion = t1_brain_with_a_bright_lesion()
    healthy = volume.copy()
    healthy[lesion] = 450.0
    tissue = brain & ~lesion

    def shift(version: str) -> float:
        return float(
            np.abs(normalise(volume, brain, version)[tissue] - normalise(healthy, brain, version)[tissue]).max()
        )

    assert shift("2") < 0.02 and shift("1") > 0.2


def test_the_soft_knee_is_continuous_increasing_and_below_one() -> None:
    x = np.linspace(0, 3, 10_001)  # up to 7.5x the median level
    y = soft_knee(x)
    assert np.all(np.diff(y) > 0) and y.max() < 1.0 and soft_knee(np.array([1e6]))[0] <= 1.0
    np.testing.assert_array_equal(y[x <= KNEE], x[x <= KNEE])
    assert abs(soft_knee(np.array([KNEE + 1e-6]))[0] - KNEE) < 2e-6


def test_a_lesion_darker_than_the_darkest_tissue_stays_darker() -> None:
    """T2: white matter is the darkest tissue (most of the 1st percentile); a haemorrhage is darker still."""
    rng = np.random.default_rng(1)
    shape = (20, 40, 40)
    levels = rng.choice([900.0, 550.0, 330.0], size=shape, p=[0.15, 0.45, 0.40])  # T2: CSF, GM, WM
    volume = (levels + rng.normal(0, 10, shape)).astype(np.float32)
    brain = np.ones(shape, bool)
    lesion = np.zeros(shape, bool)
    lesion[8:12, 15:25, 15:27] = True
    volume[lesion] = 200.0
    scaled = normalise(volume, brain, "2", "t2")
    white = ~lesion & (np.abs(volume - 330) < 30)
    assert scaled[lesion].max() < scaled[white].min() - 0.02 and scaled[white].min() > 0.03


def test_each_contrast_has_its_median_level() -> None:
    volume, brain, _ = t1_brain_with_a_bright_lesion()
    for contrast, level in MEDIAN_LEVEL.items():
        assert np.median(normalise(volume, brain, "2", contrast)[brain]) == pytest.approx(level, abs=0.01)


def test_errors() -> None:
    volume, brain, _ = t1_brain_with_a_bright_lesion()
    with pytest.raises(PreprocessingError, match="empty"):
        normalise(volume, np.zeros_like(brain), "2")
    with pytest.raises(PreprocessingError, match="no intensity contrast"):
        normalise(np.ones_like(volume), brain, "2")
    with pytest.raises(ValueError, match="unknown intensity scaling version"):
        normalise(volume, brain, "3")
