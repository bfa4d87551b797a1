"""The quality gate's measures and thresholds (see the package docstring for why it exists).

All measures are taken on the model grid, which lies in atlas space, so the atlas's own brain mask and
tissue probabilities say where every structure should be once the registration has worked:

- **registration_similarity**: normalised correlation, inside the atlas brain, between the registered
  volume and a template of the atlas anatomy, for the contrast that fits best (the MNI152 T1 itself,
  and T2- and FLAIR-like templates painted from its tissue probabilities). Affine registration of a
  real head lands its anatomy on the atlas's; a phantom, noise, or a head whose pixels contradict
  their orientation tags (mirrored, rows flipped) cannot be brought there by a proper affine.
- **mask_agreement**: Dice between the subject's brain mask and the atlas brain (both where the field
  of view covers), the shape check; **brain_volume_ml**: the atlas brain's volume scaled by the
  registration's determinant, the size check (an adult brain, not a bottle or a neck).
- **coverage**: the fraction of the atlas brain inside the screened slab that the field of view covers.
  Uncovered voxels are left out of the analysis by the preprocessing; below ``min_coverage`` the
  series is refused (a partial slab has too little anatomy to register and normalise reliably).
- **contrast_margin**: tissue medians (CSF, grey and white matter cores of the atlas) of the
  normalised volume, and the smallest step of the order the model's contrast requires (T1: WM > GM >
  CSF; T2: CSF > GM > WM; FLAIR: GM > WM > CSF). Negative means the order is wrong: a T2 sent to a T1
  model, a FLAIR to a T2 model.
- **anomaly_fraction** (after inference): the segmented volume over the brain volume screened. A real
  lesion load stays well below it; a model answering an input it cannot represent floods the brain.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import SimpleITK as sitk

from models.atlas import CONTRASTS, Atlas
from models.data.volumes import atlas_priors
from models.preprocessing import ModelGeometry, Preprocessed, atlas_to_model_grid
from models.quality.thresholds import QualityThresholds

CSF, GM, WM = 0, 1, 2
TISSUES = ("csf", "gm", "wm")
# (brighter, darker) tissue pairs each contrast must show.
ORDER: dict[str, tuple[tuple[int, int], ...]] = {
    "t1": ((WM, GM), (GM, CSF)),
    "t2": ((CSF, GM), (GM, WM)),
    "flair": ((GM, WM), (WM, CSF)),
}
CORE_PROBABILITY = 0.7  # a voxel belongs to a tissue's core where the atlas gives it at least this probability


@dataclass(frozen=True)
class QualityReport:
    """The gate's measures of one series (see the module docstring); plain numbers, ready for JSON."""

    contrast: str  # the model's contrast class, which the tissue order is checked against
    registration_similarity: float
    looks_like: str  # the contrast whose template fits best
    similarity_by_contrast: dict[str, float]
    mask_agreement: float
    brain_volume_ml: float
    coverage: float
    tissue_medians: dict[str, float]
    contrast_margin: float
    seconds: float
    anomaly_fraction: float | None = None  # set after inference

    def problems(self, thresholds: QualityThresholds) -> list[str]:
        """Why the model must not see this series (empty: it may), one short clause per failed check."""
        t = thresholds
        found = []
        if self.coverage < t.min_coverage:
            found.append(f"the field of view covers {self.coverage:.0%} of the brain (minimum {t.min_coverage:.0%})")
        if self.registration_similarity < t.min_registration_similarity:
            found.append(
                f"registration to the atlas failed: similarity {self.registration_similarity:.2f} "
                f"(minimum {t.min_registration_similarity:.2f}; not a head, or pixels contradict their orientation)"
            )
        if self.mask_agreement < t.min_mask_agreement:
            found.append(
                f"implausible brain mask: agreement {self.mask_agreement:.2f} (minimum {t.min_mask_agreement:.2f})"
            )
        if not t.min_brain_volume_ml <= self.brain_volume_ml <= t.max_brain_volume_ml:
            found.append(
                f"implausible brain volume {self.brain_volume_ml:.0f} mL "
                f"(expected {t.min_brain_volume_ml:.0f}-{t.max_brain_volume_ml:.0f})"
            )
        if self.contrast_margin < t.min_contrast_margin:
            # Which contrast it resembles means something only where the anatomy was found.
            registered = self.registration_similarity >= t.min_registration_similarity
            resembles = f"; it looks like {self.looks_like.upper()}" if registered else ""
            found.append(
                f"tissue contrast is not {self.contrast.upper()} (margin {self.contrast_margin:.3f}, minimum "
                f"{t.min_contrast_margin:.3f}{resembles})"
            )
        return found

    def answer_problem(self, thresholds: QualityThresholds) -> str | None:
        """Why the model's answer must not be reported as a finding, or None."""
        if self.anomaly_fraction is not None and self.anomaly_fraction > thresholds.max_anomaly_fraction:
            return (
                f"implausible answer: {self.anomaly_fraction:.0%} of the brain anomalous "
                f"(maximum {thresholds.max_anomaly_fraction:.0%}); the input is not something the model can judge"
            )
        return None

    def with_answer(self, mask: np.ndarray, brain_mask: np.ndarray) -> QualityReport:
        """This report with the anomalous fraction of the screened brain (model-grid masks)."""
        brain = int(np.count_nonzero(brain_mask))
        return replace(self, anomaly_fraction=float(np.count_nonzero(mask & brain_mask)) / max(brain, 1))

    def as_dict(self) -> dict:
        return _rounded(asdict(self))


class QualityGate:
    """The measures, with what they need from the atlas computed once per process (~0.3 s)."""

    def __init__(self, atlas: Atlas, geometry: ModelGeometry) -> None:
        priors = atlas_priors(geometry)  # (CSF, GM, WM, z, y, x) on the model grid
        self._atlas_brain = priors.sum(axis=0) >= 0.5
        self._cores = [(priors[k] >= CORE_PROBABILITY) & self._atlas_brain for k in range(3)]
        self._templates = {name: atlas_to_model_grid(atlas.template(name), geometry) for name in CONTRASTS}
        spacing = np.prod(atlas.brain_mask.GetSpacing())
        self._atlas_brain_ml = float(np.count_nonzero(sitk.GetArrayViewFromImage(atlas.brain_mask))) * spacing / 1000

    def measure(self, prepared: Preprocessed, contrast: str) -> QualityReport:
        """The measures of one preprocessed series, for a model of ``contrast`` (t1, t2 or flair)."""
        if contrast not in ORDER:
            raise ValueError(f"unknown contrast {contrast!r}; expected one of {', '.join(CONTRASTS)}")
        started = time.perf_counter()
        covered, brain, volume = prepared.covered, prepared.brain_mask, prepared.volume
        atlas_brain = self._atlas_brain & covered
        inside = atlas_brain & brain
        similarity = {
            name: _correlation(volume[inside], template[inside]) for name, template in self._templates.items()
        }
        looks_like = max(similarity, key=lambda name: similarity[name])
        medians = [float(np.median(volume[core & inside])) if (core & inside).any() else 0.0 for core in self._cores]
        matrix = np.array(prepared.atlas_to_input.GetMatrix()).reshape(3, 3)
        return QualityReport(
            contrast=contrast,
            registration_similarity=similarity[looks_like],
            looks_like=looks_like,
            similarity_by_contrast=similarity,
            mask_agreement=_dice(brain, atlas_brain),
            brain_volume_ml=self._atlas_brain_ml * abs(float(np.linalg.det(matrix))),
            coverage=float(np.count_nonzero(atlas_brain)) / max(int(np.count_nonzero(self._atlas_brain)), 1),
            tissue_medians=dict(zip(TISSUES, medians, strict=True)),
            contrast_margin=min(medians[bright] - medians[dark] for bright, dark in ORDER[contrast]),
            seconds=time.perf_counter() - started,
        )


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is flat or empty (nothing to correlate is no evidence)."""
    if a.size < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 2.0 * float(np.count_nonzero(a & b)) / total if total else 0.0


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return float(f"{value:.4g}") if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value
