"""Evaluate a scorer on an ``EvaluationSet`` the way the paper does, and tabulate methods side by side.

Each case is scored once (raw residual -> ``anomaly_score``); the threshold is the one that maximises
the mean validation Dice; test Dice uses that threshold, AUPRC/AUROC are per volume over the eroded
brain mask's voxels (threshold-free), and all are means over volumes. Healthy cases give the false
positive volume at the chosen threshold: what a radiologist would see on a normal scan.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from models.anomaly_map import anomaly_score, eroded_brain_mask, segment
from models.evaluation.baselines import Scorer
from models.evaluation.cases import EvaluationCase, EvaluationSet
from models.evaluation.metrics import VOXEL_ML, auroc, average_precision, best_threshold, dice, false_positive_ml


@dataclass(frozen=True)
class CaseResult:
    """Test metrics of one lesion case."""

    case: str
    kind: str
    polarity: str
    dice: float
    auprc: float
    auroc: float
    lesion_ml: float
    predicted_ml: float


@dataclass(frozen=True)
class MethodResult:
    """One method's figures on the test cases (means over volumes) and on the healthy cases."""

    method: str
    threshold: float
    validation_dice: float  # mean validation Dice at ``threshold``: choices (checkpoint, noise ensemble) use this,
    # never the test figures
    dice: float
    auprc: float
    auroc: float
    healthy_fp_ml: float
    by_polarity: dict[str, dict[str, float]]  # "dark"/"bright" -> {"dice": ..., "auprc": ...}
    cases: list[CaseResult]
    seconds_per_volume: float


def evaluate_method(name: str, scorer: Scorer, evaluation: EvaluationSet) -> MethodResult:
    """Score every case once, choose the threshold on validation, report test and healthy figures."""
    if not evaluation.validation or not evaluation.test:
        raise ValueError("the evaluation set needs validation and test cases")
    seconds: list[float] = []

    def score(case: EvaluationCase) -> np.ndarray:
        start = time.perf_counter()
        result = case_score(scorer, case)
        seconds.append(time.perf_counter() - start)
        return result

    validation_scores = [score(case) for case in evaluation.validation]
    threshold = best_threshold(
        validation_scores,
        [_truth(case) for case in evaluation.validation],
        [eroded_brain_mask(case.brain_mask) for case in evaluation.validation],
    )
    validation = [case_result(c, s, threshold) for c, s in zip(evaluation.validation, validation_scores, strict=True)]
    cases = [case_result(case, score(case), threshold) for case in evaluation.test]
    healthy_fp = [false_positive_ml(segment(score(case), threshold)) for case in evaluation.healthy]
    by_polarity = {
        polarity: {
            "dice": _mean([c.dice for c in cases if c.polarity == polarity]),
            "auprc": _mean([c.auprc for c in cases if c.polarity == polarity]),
        }
        for polarity in ("dark", "bright")
    }
    return MethodResult(
        method=name,
        threshold=threshold,
        validation_dice=_mean([c.dice for c in validation]),
        dice=_mean([c.dice for c in cases]),
        auprc=_mean([c.auprc for c in cases]),
        auroc=_mean([c.auroc for c in cases]),
        healthy_fp_ml=_mean(healthy_fp),
        by_polarity=by_polarity,
        cases=cases,
        seconds_per_volume=float(np.mean(seconds)),
    )


def format_table(results: list[MethodResult]) -> str:
    """A markdown table, one row per method: Dice/AUPRC/AUROC as %, FP in mL."""
    header = (
        "| method | val Dice | Dice | AUPRC | AUROC | Dice dark | Dice bright | AUPRC dark | AUPRC bright "
        "| healthy FP mL | threshold | s/volume |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        cells = [
            r.method,
            _percent(r.validation_dice),
            _percent(r.dice),
            _percent(r.auprc),
            _percent(r.auroc),
            _percent(r.by_polarity["dark"]["dice"]),
            _percent(r.by_polarity["bright"]["dice"]),
            _percent(r.by_polarity["dark"]["auprc"]),
            _percent(r.by_polarity["bright"]["auprc"]),
            f"{r.healthy_fp_ml:.1f}",
            f"{r.threshold:.4g}",
            f"{r.seconds_per_volume:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_json(results: list[MethodResult]) -> dict:
    """Plain JSON-serialisable figures (NaN becomes None), for model cards and benchmark records."""
    return {"voxel_ml": VOXEL_ML, "methods": [json_safe(asdict(r)) for r in results]}


def _truth(case: EvaluationCase) -> np.ndarray:
    if case.lesion_mask is None:
        return np.zeros(case.brain_mask.shape, dtype=bool)
    return np.asarray(case.lesion_mask, dtype=bool)


def case_score(scorer: Scorer, case: EvaluationCase) -> np.ndarray:
    """The scorer's residual through the shared post-processing: what every method is judged on."""
    residual = scorer(case.volume, case.brain_mask)
    return anomaly_score(np.asarray(residual, dtype=np.float32), case.brain_mask)


def case_result(case: EvaluationCase, score: np.ndarray, threshold: float) -> CaseResult:
    """Dice at ``threshold`` and the threshold-free AUPRC/AUROC of one case's post-processed score map."""
    truth = _truth(case)
    prediction = segment(score, threshold)
    inside = eroded_brain_mask(case.brain_mask)
    return CaseResult(
        case=case.name,
        kind=case.kind or "none",
        polarity=case.polarity or "none",
        dice=dice(prediction, truth),
        auprc=average_precision(score[inside], truth[inside]),
        auroc=auroc(score[inside], truth[inside]),
        lesion_ml=false_positive_ml(truth),
        predicted_ml=false_positive_ml(prediction),
    )


def _mean(values: list[float]) -> float:
    """Mean ignoring NaN (a volume whose lesion lies wholly outside the eroded mask has no AUPRC)."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def json_safe(value: object) -> object:
    """``value`` with NaN as None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
