"""The held-out evaluation set: Colin27 on the model grid, in the evaluated model's contrast, with simulated
lesions, scaled as the model's own preprocessing scales a scan.

Colin27 is never trained on, so every case is unseen anatomy. For T1 it is Colin27 itself; for T2 and FLAIR
its tissue (clustered from the T1, named by the atlas priors) painted at fixed mid-range class means
(models/evaluation/painting.py), never a training image. Each case is built as a scan would arrive: the lesion
is simulated in unscaled intensities, then every case, healthy ones too, gets its own mild acquisition
variation (Rician noise and a gentle bias field, relative to the volume's brightest tissue level), and only
then is it scaled by ``normalise`` with the model's preprocessing version and contrast, so the lesion takes
part in the scaling. The lesion masks do not depend on the version: two versions are judged on the same truth.

Cases cycle through the contrast's lesion kinds (balanced, the cycle running on from validation into test);
validation (for the threshold search) and test use disjoint random streams.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from models.data import brains
from models.data.volumes import atlas_priors, clustered_tissue
from models.evaluation.lesions import TissueLevels, lesion_kinds, simulate_lesion, tissue_levels
from models.evaluation.painting import PAINTED_CONTRASTS, paint_tissue
from models.preprocessing import PREPROCESSING_VERSION, Preprocessor
from models.preprocessing.intensity import normalise

# Rician noise level range, x the brightest tissue level: an SNR of 55-140 there (on Colin27 the same noise,
# 0.01-0.025 of the 1st-99th percentile range, as the version-1 evaluation added after scaling).
NOISE_SIGMA = (0.007, 0.018)
BIAS_AMPLITUDE = (0.02, 0.06)  # peak relative deviation of the multiplicative bias field
# Bump when what the Colin27 cache holds changes. It holds the model grid *before* intensity scaling (scaling
# is per case), so the preprocessing version, which only changes the scaling, is not part of its key.
COLIN27_CACHE_VERSION = "unscaled-1"
CLUSTER_SCALING = "2"  # the scaling the T1 is clustered into tissue at (never clips the WM peak)
_SPLITS = {"validation": 1, "test": 2, "healthy": 3}


@dataclass(frozen=True, eq=False)
class EvaluationCase:
    """One model-grid volume (scaled for the model), its brain mask, and (for lesion cases) the lesion's mask
    and kind."""

    name: str
    volume: np.ndarray
    brain_mask: np.ndarray
    lesion_mask: np.ndarray | None
    kind: str | None
    polarity: str | None


@dataclass(frozen=True)
class EvaluationSet:
    """Validation cases choose the threshold, test cases are scored, healthy cases count false positives;
    all of ``contrast``, scaled by preprocessing version ``scaling``."""

    validation: list[EvaluationCase] = field(default_factory=list)
    test: list[EvaluationCase] = field(default_factory=list)
    healthy: list[EvaluationCase] = field(default_factory=list)
    contrast: str = "t1"
    scaling: str = PREPROCESSING_VERSION


@dataclass(frozen=True, eq=False)
class EvaluationBrain:
    """The unscaled evaluation anatomy in one contrast, on the model grid."""

    volume: np.ndarray  # float32, unscaled (Colin27's bias-corrected units for T1, painted units otherwise)
    brain_mask: np.ndarray  # bool
    contrast: str


def colin27_model_grid(preprocessor: Preprocessor, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Colin27 (with skull) on the model grid *before* intensity scaling: (unscaled volume, brain mask).

    Cached, as preprocessing takes ~6 s. The key holds the model grid's geometry, the registration contrast
    (T1: Colin27 is a T1) and ``COLIN27_CACHE_VERSION``; not the preprocessing version, which only changes
    the scaling that each case applies itself.
    """
    unscaled, brain_mask, _ = _colin27_arrays(preprocessor, cache_dir)
    return unscaled, brain_mask


def evaluation_brain(preprocessor: Preprocessor, cache_dir: Path, contrast: str) -> EvaluationBrain:
    """Colin27 in ``contrast``: itself for T1, its tissue painted at mid-range class means for T2 and FLAIR."""
    unscaled, brain_mask, tissue = _colin27_arrays(preprocessor, cache_dir)
    if contrast == "t1":
        return EvaluationBrain(unscaled, brain_mask, "t1")
    if contrast not in PAINTED_CONTRASTS:
        raise ValueError(f"no evaluation brain for contrast {contrast!r}; known: t1, {', '.join(PAINTED_CONTRASTS)}")
    painted = np.where(brain_mask, paint_tissue(tissue, contrast), 0).astype(np.float32)
    return EvaluationBrain(painted, brain_mask, contrast)


def _colin27_arrays(preprocessor: Preprocessor, cache_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unscaled volume, brain mask, CSF/GM/WM tissue probabilities), from the cache or computed once."""
    if preprocessor.contrast != "t1":
        raise ValueError(f"Colin27 is a T1: it registers with a T1 preprocessor, not {preprocessor.contrast}")
    geometry = preprocessor.geometry
    key = hashlib.sha256(repr((COLIN27_CACHE_VERSION, "t1", geometry)).encode()).hexdigest()
    path = Path(cache_dir) / f"colin27-model-grid-{key[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path) as cached:
                return cached["unscaled"], cached["brain_mask"].astype(bool), cached["tissue"]
        except (OSError, KeyError, ValueError):
            pass  # a damaged entry is rebuilt below
    prepared = preprocessor(brains.colin27(skull=True))
    brain = prepared.brain_mask
    t1 = normalise(prepared.unscaled, brain, CLUSTER_SCALING, "t1")
    tissue = clustered_tissue(t1, brain, atlas_priors(geometry))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp.npz")
    np.savez_compressed(partial, unscaled=prepared.unscaled, brain_mask=brain, tissue=tissue)
    partial.replace(path)  # atomic: a concurrent reader never sees half a file
    return prepared.unscaled, brain, tissue


def build_evaluation_set(
    volume: np.ndarray,
    brain_mask: np.ndarray,
    seed: int = 0,
    validation: int = 10,
    test: int = 20,
    healthy: int = 2,
    *,
    contrast: str,
    version: str,
) -> EvaluationSet:
    """Lesion cases for validation and test (the contrast's kinds cycled) and healthy cases from the unscaled
    ``volume`` of ``contrast``, each scaled by preprocessing ``version``; deterministic for a seed."""
    brain = np.asarray(brain_mask, dtype=bool)
    unscaled = np.asarray(volume, dtype=np.float32)
    builder = _CaseBuilder(unscaled, brain, tissue_levels(unscaled, brain, contrast), contrast, version, seed)
    return EvaluationSet(
        validation=[builder.lesion_case("validation", i, i) for i in range(validation)],
        # Test continues the cycle where validation stopped, so small sets still cover every kind.
        test=[builder.lesion_case("test", i, validation + i) for i in range(test)],
        healthy=[builder.healthy_case(i) for i in range(healthy)],
        contrast=contrast,
        scaling=version,
    )


def acquisition_variation(
    volume: np.ndarray, brain_mask: np.ndarray, reference: float, rng: np.random.Generator
) -> np.ndarray:
    """A gentle smooth multiplicative bias field and Rician noise (sigma a fraction of ``reference``, the
    brightest tissue level) inside the brain, in unscaled units; outside the brain the volume is unchanged."""
    shape = volume.shape
    coarse = rng.standard_normal((4, 4, 4))
    field_ = ndimage.zoom(coarse, [n / 4 for n in shape], order=3)[: shape[0], : shape[1], : shape[2]]
    field_ = field_ / max(float(np.abs(field_).max()), 1e-6) * rng.uniform(*BIAS_AMPLITUDE)
    biased = volume * (1 + field_)
    sigma = rng.uniform(*NOISE_SIGMA) * reference
    real = biased + sigma * rng.standard_normal(shape)
    imaginary = sigma * rng.standard_normal(shape)
    noisy = np.sqrt(real**2 + imaginary**2)  # magnitude of complex Gaussian noise: Rician
    return np.where(brain_mask, noisy, volume).astype(np.float32)


@dataclass(frozen=True, eq=False)
class _CaseBuilder:
    volume: np.ndarray
    brain: np.ndarray
    levels: TissueLevels
    contrast: str
    version: str
    seed: int

    def lesion_case(self, split: str, index: int, cycle: int) -> EvaluationCase:
        kinds = lesion_kinds(self.contrast)
        kind, polarity = kinds[cycle % len(kinds)]
        rng = self._rng(split, index)
        lesion = simulate_lesion(self.volume, self.brain, kind, polarity, rng, self.contrast, self.levels)
        return EvaluationCase(
            name=f"{split}-{index:02d}-{kind}-{polarity}",
            volume=self._scanned(lesion.image, rng),
            brain_mask=self.brain,
            lesion_mask=lesion.mask,
            kind=kind,
            polarity=polarity,
        )

    def healthy_case(self, index: int) -> EvaluationCase:
        return EvaluationCase(
            name=f"healthy-{index:02d}",
            volume=self._scanned(self.volume, self._rng("healthy", index)),
            brain_mask=self.brain,
            lesion_mask=None,
            kind=None,
            polarity=None,
        )

    def _scanned(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Acquisition variation, then the model's intensity scaling: what the model sees of the scan."""
        varied = acquisition_variation(image, self.brain, self.levels.brightest, rng)
        return normalise(varied, self.brain, self.version, self.contrast)

    def _rng(self, split: str, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLITS[split], index])
