"""Simplex noise: seeded, one independent field per (sample, channel), unit variance, spatially smooth."""

from __future__ import annotations

import pytest
import torch

from models.diffusion.simplex import simplex_noise

SHAPE = (8, 1, 48, 48)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def noise(seed: int = 0, shape: tuple[int, int, int, int] = SHAPE, octaves: int = 6, frequency: float = 64.0):
    return simplex_noise(shape, torch.Generator().manual_seed(seed), octaves, 0.8, frequency)


def lag_correlation(fields: torch.Tensor, lag: int) -> float:
    """Mean correlation of each field with itself shifted by ``lag`` pixels along x."""
    a = fields[..., :-lag].flatten(-2)
    b = fields[..., lag:].flatten(-2)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean())


def test_same_seed_same_tensor_other_seed_other_tensor() -> None:
    assert torch.equal(noise(3), noise(3))
    assert not torch.allclose(noise(3), noise(4))


def test_shape_dtype_and_device_arguments() -> None:
    out = simplex_noise(
        (2, 3, 16, 24), torch.Generator().manual_seed(0), 3, 0.8, 8.0, device="cpu", dtype=torch.float64
    )
    assert out.shape == (2, 3, 16, 24)
    assert out.dtype == torch.float64


def test_each_field_is_standardised() -> None:
    out = noise(1)
    assert torch.allclose(out.mean(dim=(2, 3)), torch.zeros(8, 1), atol=1e-5)
    assert torch.allclose(out.std(dim=(2, 3)), torch.ones(8, 1), atol=1e-4)


def test_fields_differ_between_samples_and_channels() -> None:
    out = simplex_noise((4, 2, 48, 48), torch.Generator().manual_seed(2), 6, 0.8, 64.0).flatten(0, 1).flatten(1)
    corr = torch.corrcoef(out)
    off_diagonal = corr[~torch.eye(len(corr), dtype=torch.bool)].abs()
    assert float(off_diagonal.max()) < 0.9  # no two fields are copies (or sign flips) of each other
    assert float(off_diagonal.mean()) < 0.35  # and on average they are far from it


def test_strongly_correlated_in_space_unlike_gaussian() -> None:
    assert lag_correlation(noise(5), 1) > 0.5
    assert abs(lag_correlation(torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)), 1)) < 0.1


def test_not_periodic_or_degenerate() -> None:
    out = noise(6, shape=(4, 1, 96, 96))
    assert out.unique().numel() > 0.9 * out.numel()  # a real continuous field, not a few repeated values
    for lag in (8, 16, 24, 32, 48):
        assert lag_correlation(out, lag) < 0.9  # no repetition at any of these shifts


def test_one_octave_smoother_than_six() -> None:
    assert lag_correlation(noise(7, octaves=1), 1) > lag_correlation(noise(7, octaves=6), 1)


def test_frequency_is_the_coarse_lattice_period_in_pixels() -> None:
    # A longer period (frequency) makes neighbouring pixels more alike.
    assert lag_correlation(noise(8, octaves=1, frequency=64.0), 2) > lag_correlation(
        noise(8, octaves=1, frequency=8.0), 2
    )
