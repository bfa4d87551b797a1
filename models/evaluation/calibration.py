"""``uad-node calibrate``: a checkpoint's threshold set on a site's own healthy scans.

A threshold tuned on public brains says little about the false positives another site's scanners and protocols
give; a site knows what it can tolerate on a healthy brain. The rule: the SMALLEST threshold (the most
sensitive) at which the false-positive volume of the post-processed segmentation, measured on each healthy
scan's own grid exactly as the node's SEG (``scoring.native_mask``), is at most ``max_fp_ml`` on at least
``quantile`` of the healthy scans.

It is found exactly. The segmentation changes only where the threshold passes one of a scan's score values, and
the false-positive volume never grows with the threshold (a higher threshold keeps a subset of the voxels; each
surviving component lies inside a component at least as large, so small-component removal keeps the subset;
the linear resampling to the scan's grid and its cut at one half keep it too). So each scan's smallest threshold
within the bound is found by bisection over its own score values, and the rule's threshold is the k-th smallest
of those, k = ceil(quantile x scans): any lower threshold leaves fewer than k scans within the bound.

With labelled lesion cases the threshold is instead the one, among those at or above the rule's, that maximises
the mean Dice on the lesion cases on the model grid (the search of ``metrics.best_threshold``); every healthy
figure still holds, since a higher threshold only removes false positives.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.anomaly_map import eroded_brain_mask
from models.checkpoint import Checkpoint
from models.evaluation.baselines import Scorer
from models.evaluation.dataset_evaluation import prepare_all
from models.evaluation.datasets import DatasetError, find_dataset, find_healthy
from models.evaluation.metrics import best_threshold, mean_dice_at
from models.evaluation.scoring import ScoredVolume, native_mask, score_volume, volume_ml
from models.preprocessing import Preprocessor

DEFAULT_QUANTILE = 0.95


@dataclass(frozen=True)
class Calibration:
    """The chosen threshold and the figures that justify it."""

    threshold: float
    smallest: float  # the smallest threshold within the bound (== threshold without lesion cases)
    max_fp_ml: float
    quantile: float
    healthy: list[str]  # the healthy scans' ids, in the order of ``fp_ml``
    fp_ml: list[float]  # each healthy scan's false-positive volume at ``threshold``, on its own grid
    lesion_cases: int = 0
    lesion_dice: float | None = None  # mean model-grid Dice of the lesion cases at ``threshold``
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable scans and cases, with the reason

    @property
    def needed(self) -> int:
        """How many healthy scans must stay within the bound."""
        return scans_needed(len(self.fp_ml), self.quantile)

    @property
    def within(self) -> int:
        return sum(fp <= self.max_fp_ml for fp in self.fp_ml)

    @property
    def rule(self) -> str:
        """The rule in words, as recorded in the checkpoint and printed."""
        bound = (
            f"the false-positive volume of the segmentation on each healthy scan's own grid (as the node's SEG) is "
            f"at most {self.max_fp_ml:g} mL on at least {100 * self.quantile:g} % of the {len(self.fp_ml)} healthy "
            f"scans ({self.needed} of {len(self.fp_ml)})"
        )
        if not self.lesion_cases:
            return f"the smallest threshold at which {bound}"
        return (
            f"the threshold with the best mean model-grid Dice on {self.lesion_cases} lesion cases among those at or "
            f"above the smallest threshold ({self.smallest:.6g}) at which {bound}"
        )

    def record(self, source_path: Path, source: Checkpoint, date: datetime.date | None = None) -> dict[str, Any]:
        """The checkpoint's ``calibration`` entry."""
        return {
            "rule": self.rule,
            "max_fp_ml": self.max_fp_ml,
            "quantile": self.quantile,
            "scans": len(self.fp_ml),
            "fp_ml": [round(fp, 4) for fp in self.fp_ml],
            "lesion_cases": self.lesion_cases,
            "lesion_dice": self.lesion_dice,
            "date": (date or datetime.date.today()).isoformat(),
            "source_checkpoint": str(source_path),
            "source_hash": source.content_hash,
            "previous_threshold": source.threshold,
        }


def scans_needed(scans: int, quantile: float) -> int:
    """ceil(quantile x scans): the healthy scans that must be within the bound (at least one)."""
    return max(1, math.ceil(quantile * scans - 1e-9))


def false_positive_ml(scored: ScoredVolume, threshold: float) -> float:
    """A healthy scan's false-positive volume at ``threshold``: the node's segmentation on the scan's own grid."""
    return volume_ml(native_mask(scored, threshold))


def scan_threshold(scored: ScoredVolume, max_fp_ml: float) -> float:
    """The smallest threshold at which this healthy scan's false-positive volume is at most ``max_fp_ml``.

    Exact: the answer is 0 or one of the scan's score values (see the module docstring); above the highest
    one nothing is segmented, so a bound >= 0 is always met there.
    """
    candidates = np.concatenate([[0.0], np.unique(scored.score[scored.score > 0]).astype(np.float64)])
    if false_positive_ml(scored, float(candidates[0])) <= max_fp_ml:
        return 0.0
    low, high = 0, len(candidates) - 1  # above the bound at ``low``, within it at ``high``
    while high - low > 1:
        middle = (low + high) // 2
        if false_positive_ml(scored, float(candidates[middle])) <= max_fp_ml:
            high = middle
        else:
            low = middle
    return float(candidates[high])


def smallest_threshold(scans: list[ScoredVolume], max_fp_ml: float, quantile: float) -> float:
    """The rule: the smallest threshold within the bound on at least ``quantile`` of ``scans``."""
    if not scans:
        raise ValueError("no healthy scans to calibrate on")
    per_scan = sorted(scan_threshold(scored, max_fp_ml) for scored in scans)
    return per_scan[scans_needed(len(scans), quantile) - 1]


def best_dice_threshold(floor: float, lesions: list[ScoredVolume]) -> float:
    """The threshold >= ``floor`` with the best mean model-grid Dice on ``lesions``.

    ``metrics.best_threshold`` searches scores cut at the floor (values at or below it set to 0): at and above
    the floor they segment as the real scores, below it as the real scores at the floor, so its answer, raised
    to the floor, is the best threshold above it with the candidate density of its own search.
    """
    truths = [scored.volume.truth for scored in lesions]
    if not lesions or any(truth is None for truth in truths):
        raise ValueError("every lesion case needs a label")
    cut = [np.where(scored.score > floor, scored.score, np.float32(0)) for scored in lesions]
    masks = [eroded_brain_mask(scored.prepared.brain_mask) for scored in lesions]
    return max(best_threshold(cut, truths, masks), floor)  # type: ignore[arg-type]


def calibrate(
    healthy: Path,
    scorer: Scorer,
    preprocessor: Preprocessor,
    *,
    max_fp_ml: float,
    quantile: float = DEFAULT_QUANTILE,
    lesions: Path | None = None,
    layout: str = "auto",
    modality: str = "t1",
    progress: Callable[[str], None] = print,
) -> Calibration:
    """Score the healthy scans under ``healthy`` (and the labelled cases under ``lesions``) and apply the rule.

    Unreadable scans are skipped with their reason (through ``progress`` and in ``skipped``). Raises
    DatasetError when no healthy scan (or, with ``lesions``, no lesion case) can be read, ValueError for a
    bound or quantile out of range.
    """
    if not max_fp_ml >= 0:
        raise ValueError(f"--max-fp-ml must be >= 0 mL, not {max_fp_ml}")
    if not 0 < quantile <= 1:
        raise ValueError(f"--quantile must be in (0, 1], not {quantile}")
    skipped: list[dict[str, str]] = []
    scans = find_healthy(healthy)
    clean = [score_volume(scorer, v) for v in prepare_all(scans, preprocessor, skipped, progress, "healthy scan")]
    if not clean:
        raise DatasetError(f"{healthy}: none of the {len(scans)} healthy scans could be read ({skipped[0]['reason']})")
    labelled: list[ScoredVolume] = []
    if lesions is not None:
        _, cases = find_dataset(lesions, layout, modality)
        prepared = prepare_all(cases, preprocessor, skipped, progress, "lesion case")
        if not prepared:
            reason = skipped[-1]["reason"]
            raise DatasetError(f"{lesions}: none of the {len(cases)} lesion cases could be read ({reason})")
        labelled = [score_volume(scorer, volume) for volume in prepared]
    floor = smallest_threshold(clean, max_fp_ml, quantile)
    threshold, lesion_dice = floor, None
    if labelled:
        threshold = best_dice_threshold(floor, labelled)
        truths = [scored.volume.truth for scored in labelled]
        lesion_dice = mean_dice_at(threshold, [scored.score for scored in labelled], truths)  # type: ignore[arg-type]
    calibration = Calibration(
        threshold=threshold,
        smallest=floor,
        max_fp_ml=float(max_fp_ml),
        quantile=float(quantile),
        healthy=[scored.volume.id for scored in clean],
        fp_ml=[false_positive_ml(scored, threshold) for scored in clean],
        lesion_cases=len(labelled),
        lesion_dice=lesion_dice,
        skipped=skipped,
    )
    if calibration.within < calibration.needed:  # the bisection's premise (FP non-increasing) would be broken
        raise RuntimeError(f"threshold {threshold:.6g} leaves {calibration.within} scans within the bound")
    return calibration


def calibrated_checkpoint(source: Checkpoint, source_path: Path, calibration: Calibration) -> Checkpoint:
    """The source's weights, config, training and evaluation records with the site threshold and its record;
    deployable (no training state)."""
    return dataclasses.replace(
        source, threshold=calibration.threshold, calibration=calibration.record(source_path, source), state=None
    )


def calibration_text(calibration: Calibration, previous: float | None) -> str:
    """What ``uad-node calibrate`` prints: the rule, the threshold and the figures behind it."""
    was = "none" if previous is None else f"{previous:.6g}"
    lines = [
        f"rule: {calibration.rule}",
        f"threshold {calibration.threshold:.6g} (was {was}; smallest within the bound {calibration.smallest:.6g})",
        f"healthy false positives at the threshold: {calibration.within} of {len(calibration.fp_ml)} scans within "
        f"{calibration.max_fp_ml:g} mL (needed {calibration.needed}); max {max(calibration.fp_ml):.2f} mL, "
        f"median {float(np.median(calibration.fp_ml)):.2f} mL",
        *(f"  {scan}: {fp:.2f} mL" for scan, fp in zip(calibration.healthy, calibration.fp_ml, strict=True)),
    ]
    if calibration.lesion_dice is not None:
        lines.append(f"lesion cases: {calibration.lesion_cases}, mean model-grid Dice {calibration.lesion_dice:.3f}")
    lines += [f"skipped {entry['id']}: {entry['reason']}" for entry in calibration.skipped]
    return "\n".join(lines)
