"""Synthetic anatomies (models/data/anatomy.py) on a phantom brain: diffeomorphic, deterministic, ventricles
that grow and shrink, tissue that stays a partition of the brain."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.data.anatomy import AnatomyConfig, _integrate, _random_velocity, random_anatomy

SHAPE = (50, 96, 96)


def phantom() -> tuple[torch.Tensor, torch.Tensor]:
    """An ellipsoid brain: a CSF ventricle in the middle, white matter around it, a grey matter shell."""
    z, y, x = np.indices(SHAPE, dtype=np.float32)
    radius = np.sqrt(((z - 25) / 22) ** 2 + ((y - 48) / 40) ** 2 + ((x - 48) / 34) ** 2)
    brain = radius < 1.0
    csf = (radius < 0.25).astype(np.float32)
    grey = ((radius >= 0.8) & brain).astype(np.float32)
    white = (brain & (radius >= 0.25) & (radius < 0.8)).astype(np.float32)
    return torch.from_numpy(np.stack([csf, grey, white])), torch.from_numpy(brain)


def ventricle_ml(tissue: torch.Tensor) -> float:
    return float(tissue[0].sum()) * 0.008


def test_deterministic_and_different_per_seed() -> None:
    tissue, mask = phantom()
    first = random_anatomy(tissue, mask, AnatomyConfig(), torch.Generator().manual_seed(1))
    again = random_anatomy(tissue, mask, AnatomyConfig(), torch.Generator().manual_seed(1))
    other = random_anatomy(tissue, mask, AnatomyConfig(), torch.Generator().manual_seed(2))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert (first[0] - other[0]).abs().mean() > 0.005


def test_tissue_stays_a_partition_of_the_brain() -> None:
    tissue, mask = phantom()
    for seed in range(3):
        new_tissue, new_mask = random_anatomy(tissue, mask, AnatomyConfig(), torch.Generator().manual_seed(seed))
        total = new_tissue.sum(dim=0)
        assert torch.allclose(total[new_mask], torch.ones(()), atol=1e-4)
        assert torch.all(total[~new_mask] == 0)
        assert 0.85 < float(new_mask.sum() / mask.sum()) < 1.15  # shape changes, size about kept


@pytest.mark.parametrize(("scale", "grows"), [(1.5, True), (0.7, False)])
def test_ventricles_grow_and_shrink(scale: float, grows: bool) -> None:
    tissue, mask = phantom()
    config = AnatomyConfig(velocity_vox=0.0, ventricle_scale=(scale, scale))
    new_tissue, _ = random_anatomy(tissue, mask, config, torch.Generator().manual_seed(0))
    ratio = ventricle_ml(new_tissue) / ventricle_ml(tissue)
    if grows:
        assert ratio > 1.5**2  # a volume grows about as the cube of a linear scale
    else:
        assert ratio < 0.7**1.5


def test_the_deformation_never_folds() -> None:
    """The Jacobian determinant of the integrated field is positive everywhere, even at twice the default."""
    config = dataclasses.replace(AnatomyConfig(), velocity_vox=2 * AnatomyConfig().velocity_vox)
    for seed in range(3):
        velocity = _random_velocity(SHAPE, config, torch.Generator().manual_seed(seed))
        displacement = _integrate(velocity, config.squarings).numpy()  # (3, D, H, W) as (x, y, z)
        gradients = [np.gradient(displacement[c], axis=(2, 1, 0)) for c in range(3)]  # d/dx, d/dy, d/dz
        jacobian = np.eye(3)[:, :, None, None, None] + np.array(gradients)
        determinant = np.linalg.det(np.moveaxis(jacobian, (0, 1), (-2, -1)))
        assert determinant.min() > 0, (seed, determinant.min())
