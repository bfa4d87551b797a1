"""Segmentation and ranking metrics, as the paper reports them (Dice, AUPRC, AUROC), in plain numpy.

AUPRC is scikit-learn's ``average_precision_score`` (the step-wise sum over distinct thresholds, no
interpolation) and AUROC the Mann-Whitney statistic with ties counted half, so figures compare with
the paper's. The threshold search is the paper's: the one threshold that maximises the mean Dice of
the validation volumes after the full segmentation (including small-component removal).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from models.anomaly_map import segment

VOXEL_ML = 0.008  # a 2 mm isotropic model-grid voxel
_COARSE_QUANTILES = 1 - np.logspace(-5, np.log10(0.5), 60)  # dense in the upper tail, where lesions are


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """2|P∩T| / (|P| + |T|); 1.0 when both are empty (nothing to find, nothing found)."""
    p = np.asarray(prediction, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as scikit-learn computes it: sum over distinct thresholds of
    (recall gain) x precision, tied scores entering together. NaN when there are no positives."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last index of each run of equal scores
    true_pos = np.cumsum(y)[last_of_tie]
    predicted = last_of_tie + 1
    precision = true_pos / predicted
    recall_gain = np.diff(np.r_[0, true_pos]) / positives
    return float(np.sum(recall_gain * precision))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a positive outscores a negative, ties counted half.
    NaN when either class is empty."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = stats.rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def false_positive_ml(segmentation: np.ndarray, voxel_ml: float = VOXEL_ML) -> float:
    """Segmented volume in mL; on a healthy volume every segmented voxel is a false positive."""
    return float(np.count_nonzero(segmentation)) * voxel_ml


def mean_dice_at(threshold: float, scores: list[np.ndarray], truths: list[np.ndarray]) -> float:
    """Mean Dice over volumes of the full segmentation (threshold + small-component removal)."""
    return float(np.mean([dice(segment(s, threshold), t) for s, t in zip(scores, truths, strict=True)]))


def best_threshold(scores: list[np.ndarray], truths: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """The threshold maximising the mean validation Dice (the paper's greedy search).

    Candidates are quantiles of the pooled in-mask scores, dense in the upper tail because lesions are
    a small fraction of the brain; then two rounds of refinement on a fine grid between the best
    candidate's neighbours. Ties go to the higher threshold (fewer false positives on healthy scans).
    """
    if not scores or not (len(scores) == len(truths) == len(masks)):
        raise ValueError("need the same, non-zero number of score maps, truths and masks")
    pooled = np.concatenate([np.asarray(s)[np.asarray(m, dtype=bool)] for s, m in zip(scores, masks, strict=True)])
    if pooled.size == 0:
        raise ValueError("the masks are empty")
    candidates = np.unique(np.quantile(pooled, _COARSE_QUANTILES))
    best_value, best_dice = float(candidates[-1]), -1.0
    for _ in range(3):
        values = np.array([mean_dice_at(float(c), scores, truths) for c in candidates])
        best = int(np.flatnonzero(values == values.max())[-1])
        if values[best] > best_dice or (values[best] == best_dice and candidates[best] > best_value):
            best_value, best_dice = float(candidates[best]), float(values[best])
        low = candidates[max(best - 1, 0)]
        high = candidates[min(best + 1, candidates.size - 1)]
        if high <= low:
            break
        candidates = np.unique(np.linspace(low, high, 12))
    return best_value
