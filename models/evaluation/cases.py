"""The held-out evaluation set: Colin27 on the model grid with simulated lesions.

Colin27 is never trained on, so every case is unseen anatomy. Cases cycle through ``LESION_KINDS``
(balanced kinds, the cycle running on from validation into test); validation (for the threshold
search) and test use disjoint random streams; every case, healthy ones too, gets its own mild
acquisition variation (Rician-like noise, a gentle bias field) so that cases differ by more than
the lesion and a method cannot win by memorising pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from models.data import brains
from models.evaluation.lesions import LESION_KINDS, simulate_lesion
from models.preprocessing import PREPROCESSING_VERSION, Preprocessor

NOISE_SIGMA = (0.01, 0.025)  # Rician noise level range (normalised intensity)
BIAS_AMPLITUDE = (0.02, 0.06)  # peak relative deviation of the multiplicative bias field
_SPLITS = {"validation": 1, "test": 2, "healthy": 3}


@dataclass(frozen=True, eq=False)
class EvaluationCase:
    """One model-grid volume, its brain mask, and (for lesion cases) the lesion's mask and kind."""

    name: str
    volume: np.ndarray
    brain_mask: np.ndarray
    lesion_mask: np.ndarray | None
    kind: str | None
    polarity: str | None


@dataclass(frozen=True)
class EvaluationSet:
    """Validation cases choose the threshold, test cases are scored, healthy cases count false positives."""

    validation: list[EvaluationCase] = field(default_factory=list)
    test: list[EvaluationCase] = field(default_factory=list)
    healthy: list[EvaluationCase] = field(default_factory=list)


def colin27_model_grid(preprocessor: Preprocessor, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Colin27 (with skull) preprocessed onto the model grid: (volume, brain mask); cached, as it takes ~6 s.

    The cache key holds the preprocessing version and the model grid's geometry, so a change to
    either recomputes instead of evaluating on a stale volume.
    """
    model = preprocessor.geometry.model
    key = hashlib.sha256(repr((PREPROCESSING_VERSION, model.size, model.spacing, model.origin)).encode()).hexdigest()
    path = Path(cache_dir) / f"colin27-model-grid-{key[:16]}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return cached["volume"], cached["brain_mask"].astype(bool)
    prepared = preprocessor(brains.colin27(skull=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp.npz")
    np.savez_compressed(partial, volume=prepared.volume, brain_mask=prepared.brain_mask)
    partial.replace(path)  # atomic: a concurrent reader never sees half a file
    return prepared.volume, prepared.brain_mask


def build_evaluation_set(
    volume: np.ndarray,
    brain_mask: np.ndarray,
    seed: int = 0,
    validation: int = 10,
    test: int = 20,
    healthy: int = 2,
) -> EvaluationSet:
    """Lesion cases for validation and test (kinds cycled), and healthy cases; deterministic for a seed."""
    brain = np.asarray(brain_mask, dtype=bool)
    return EvaluationSet(
        validation=[_lesion_case(volume, brain, seed, "validation", i, i) for i in range(validation)],
        # Test continues the cycle where validation stopped, so small sets still cover every kind.
        test=[_lesion_case(volume, brain, seed, "test", i, validation + i) for i in range(test)],
        healthy=[_healthy_case(volume, brain, seed, i) for i in range(healthy)],
    )


def acquisition_variation(volume: np.ndarray, brain_mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A gentle smooth multiplicative bias field and Rician-like noise; clipped to [0, 1], 0 outside the brain."""
    shape = volume.shape
    coarse = rng.standard_normal((4, 4, 4))
    field_ = ndimage.zoom(coarse, [n / 4 for n in shape], order=3)[: shape[0], : shape[1], : shape[2]]
    field_ = field_ / max(float(np.abs(field_).max()), 1e-6) * rng.uniform(*BIAS_AMPLITUDE)
    biased = volume * (1 + field_)
    sigma = rng.uniform(*NOISE_SIGMA)
    real = biased + sigma * rng.standard_normal(shape)
    imaginary = sigma * rng.standard_normal(shape)
    noisy = np.sqrt(real**2 + imaginary**2)  # magnitude of complex Gaussian noise: Rician
    return np.where(brain_mask, np.clip(noisy, 0, 1), 0).astype(np.float32)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split], index])


def _lesion_case(
    volume: np.ndarray, brain: np.ndarray, seed: int, split: str, index: int, cycle: int
) -> EvaluationCase:
    kind, polarity = LESION_KINDS[cycle % len(LESION_KINDS)]
    rng = _rng(seed, split, index)
    lesion = simulate_lesion(volume, brain, kind, polarity, rng)
    return EvaluationCase(
        name=f"{split}-{index:02d}-{kind}-{polarity}",
        volume=acquisition_variation(lesion.image, brain, rng),
        brain_mask=brain,
        lesion_mask=lesion.mask,
        kind=kind,
        polarity=polarity,
    )


def _healthy_case(volume: np.ndarray, brain: np.ndarray, seed: int, index: int) -> EvaluationCase:
    rng = _rng(seed, "healthy", index)
    return EvaluationCase(
        name=f"healthy-{index:02d}",
        volume=acquisition_variation(np.asarray(volume, dtype=np.float32), brain, rng),
        brain_mask=brain,
        lesion_mask=None,
        kind=None,
        polarity=None,
    )
