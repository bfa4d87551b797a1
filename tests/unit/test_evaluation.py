"""Evaluation: metrics against hand-computed values, the lesion simulator on a real preprocessed Colin27,
and the harness (an oracle scorer, a random scorer, the atlas-mean and intensity baselines).

Colin27 and the MNI152 template are preprocessed once per session (~6 s each); run with -s to see the
baselines' table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from models.anomaly_map import eroded_brain_mask
from models.evaluation import (
    LESION_KINDS,
    AtlasMeanBaseline,
    EvaluationSet,
    auroc,
    average_precision,
    best_threshold,
    build_evaluation_set,
    colin27_model_grid,
    dice,
    evaluate_method,
    false_positive_ml,
    format_table,
    intensity_baseline,
    results_json,
    simulate_lesion,
)
from models.evaluation.lesions import MIN_VISIBLE_CHANGE, white_matter
from models.preprocessing import Preprocessor
from tests import brains

# ---- metrics ---------------------------------------------------------------------------------------


def test_dice_known_values() -> None:
    a = np.array([1, 1, 0, 0], dtype=bool)
    assert dice(a, a) == 1.0
    assert dice(a, np.array([0, 1, 1, 0], dtype=bool)) == 0.5
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    assert dice(np.zeros(4, bool), a) == 0.0


def test_average_precision_hand_computed() -> None:
    # sklearn's documented example: 0.8333
    assert average_precision(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(5 / 6)
    # ties enter together: thresholds 1 (P=1/2, R=1/2) and 0 (P=1/2, R=1) -> 0.5, not 0.75 or 0.25
    assert average_precision(np.array([1.0, 1.0, 0.0, 0.0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)
    # one tie at the top: P=2/3 at R=1 (two positives in the tied group of three)
    assert average_precision(np.array([0.9, 0.9, 0.9, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(2 / 3)


def test_average_precision_perfect_inverted_and_prevalence() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    assert average_precision(np.arange(5.0), labels) == 1.0
    # inverted: positives last: P at R=1/2 is 1/4, at R=1 is 2/5
    assert average_precision(-np.arange(5.0), labels) == pytest.approx(0.5 * 0.25 + 0.5 * 0.4)
    assert average_precision(np.zeros(5), labels) == pytest.approx(0.4)  # all tied: the prevalence
    assert np.isnan(average_precision(np.arange(3.0), np.zeros(3)))


def test_auroc_hand_computed_with_ties() -> None:
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([1.0, 1.0, 0.0, 0.0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)
    assert auroc(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 0])) == pytest.approx(0.75)  # one win, one tie
    assert auroc(np.arange(6.0), np.array([0, 0, 0, 1, 1, 1])) == 1.0
    assert auroc(-np.arange(6.0), np.array([0, 0, 0, 1, 1, 1])) == 0.0


def test_false_positive_ml() -> None:
    seg = np.zeros((4, 4, 4), dtype=bool)
    seg[:2, :2, :2] = True
    assert false_positive_ml(seg) == pytest.approx(0.064)


def test_best_threshold_recovers_the_separating_threshold() -> None:
    rng = np.random.default_rng(0)
    scores, truths, masks = [], [], []
    for i in range(3):
        truth = np.zeros((12, 24, 24), dtype=bool)
        truth[3:8, 4 + i : 10 + i, 5:11] = True
        score = np.where(truth, rng.uniform(0.6, 1.0, truth.shape), rng.uniform(0.0, 0.4, truth.shape))
        scores.append(score.astype(np.float32))
        truths.append(truth)
        masks.append(np.ones(truth.shape, dtype=bool))
    threshold = best_threshold(scores, truths, masks)
    lowest_lesion_score = min(float(s[t].min()) for s, t in zip(scores, truths, strict=True))
    assert 0.4 <= threshold < lowest_lesion_score  # any threshold in the gap separates perfectly


def test_best_threshold_prefers_dice_over_the_prevalence_guess() -> None:
    """Healthy noise reaching 0.7 in one region: the best threshold must sit above it, not below."""
    truth = np.zeros((12, 24, 24), dtype=bool)
    truth[2:7, 2:8, 2:8] = True
    score = np.where(truth, 0.9, 0.1).astype(np.float32)
    score[8:11, 15:20, 15:20] = 0.7  # a 75-voxel false-positive region
    threshold = best_threshold([score], [truth], [np.ones(truth.shape, dtype=bool)])
    assert 0.7 <= threshold < 0.9


# ---- real brains (session-scoped: preprocessing takes ~6 s a head) ----------------------------------


@pytest.fixture(scope="session")
def small_set(colin: tuple[np.ndarray, np.ndarray]) -> EvaluationSet:
    return build_evaluation_set(*colin, seed=0, validation=4, test=4, healthy=1)


def test_colin27_on_the_model_grid(colin: tuple[np.ndarray, np.ndarray]) -> None:
    volume, mask = colin
    assert volume.shape == mask.shape == (50, 96, 96) and mask.dtype == bool
    assert volume[~mask].max() == 0 and 0.6 < volume[mask].mean() < 0.8


@pytest.mark.parametrize(("kind", "polarity"), LESION_KINDS)
def test_lesion_on_colin27(colin: tuple[np.ndarray, np.ndarray], kind: str, polarity: str) -> None:
    volume, brain = colin
    ranges_ml = {"tumour": (5.0, 90.0), "wmh": (0.1, 4.0), "stroke": (2.0, 40.0)}
    for seed in range(3):
        lesion = simulate_lesion(volume, brain, kind, polarity, np.random.default_rng(seed))
        again = simulate_lesion(volume, brain, kind, polarity, np.random.default_rng(seed))
        assert np.array_equal(lesion.image, again.image) and np.array_equal(lesion.mask, again.mask)
        assert lesion.mask.any() and not lesion.mask[~brain].any()
        assert lesion.image.min() >= 0 and lesion.image.max() <= 1 and lesion.image[~brain].max() == 0
        low, high = ranges_ml[kind]
        assert low <= lesion.mask.sum() * 0.008 <= high
        change = lesion.image[lesion.mask].astype(np.float64) - volume[lesion.mask]
        if polarity == "dark":
            assert change.mean() < -0.1
        else:  # a bright tumour's core is raised; its thinner oedema rim is darkened
            assert (change >= MIN_VISIBLE_CHANGE).mean() > 0.3
        outside = np.abs(lesion.image - volume)[~lesion.mask]
        assert outside.mean() < 0.001  # outside the truth only a partial-volume rim changes
        visible = np.abs(lesion.image - volume) >= MIN_VISIBLE_CHANGE
        rim = ndimage.distance_transform_edt(~lesion.mask) <= 1.5
        assert (visible & ~rim).sum() <= 0.01 * lesion.mask.sum() + 5  # visible change = truth + partial-volume rim


def test_bright_lesions_raise_the_mean(colin: tuple[np.ndarray, np.ndarray]) -> None:
    volume, brain = colin
    for kind in ("tumour", "wmh"):
        means = []
        for seed in range(5):
            lesion = simulate_lesion(volume, brain, kind, "bright", np.random.default_rng(seed))
            means.append(float(lesion.image[lesion.mask].mean() - volume[lesion.mask].mean()))
        assert np.median(means) > 0.02, (kind, means)


def test_stroke_reaches_the_cortex(colin: tuple[np.ndarray, np.ndarray]) -> None:
    volume, brain = colin
    depth = ndimage.distance_transform_edt(brain)
    for seed in range(3):
        lesion = simulate_lesion(volume, brain, "stroke", "dark", np.random.default_rng(seed))
        assert depth[lesion.mask].min() <= 2  # touches the brain's outer 4 mm
        assert depth[lesion.mask].max() >= 3  # and reaches into the brain


def test_wmh_lie_in_white_matter(colin: tuple[np.ndarray, np.ndarray]) -> None:
    volume, brain = colin
    wm = ndimage.binary_dilation(white_matter(volume, brain), iterations=1)
    for polarity in ("dark", "bright"):
        lesion = simulate_lesion(volume, brain, "wmh", polarity, np.random.default_rng(1))
        assert wm[lesion.mask].mean() > 0.95
        assert ndimage.label(lesion.mask)[1] >= 2


def test_evaluation_set_is_balanced_disjoint_and_varied(small_set: EvaluationSet) -> None:
    kinds = [(c.kind, c.polarity) for c in small_set.validation + small_set.test]
    assert set(kinds) == set(LESION_KINDS)
    assert small_set.healthy[0].lesion_mask is None
    a, b = small_set.validation[0], small_set.test[1]  # both dark tumours, from different streams
    assert (a.kind, a.polarity) == (b.kind, b.polarity) and not np.array_equal(a.lesion_mask, b.lesion_mask)
    healthy = small_set.healthy[0]
    away = healthy.brain_mask & ~small_set.test[0].lesion_mask
    assert 0.003 < np.abs(healthy.volume - small_set.test[0].volume)[away].mean() < 0.05  # noise and bias differ


# ---- harness -------------------------------------------------------------------------------------


def truth_scorer(evaluation: EvaluationSet, transform: Callable[[np.ndarray], np.ndarray]) -> Callable:
    """A scorer that looks the case up by its volume's identity (it needs the truth, so it cheats on purpose)."""
    truths = {id(c.volume): c.lesion_mask for c in evaluation.validation + evaluation.test + evaluation.healthy}

    def score(volume: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
        truth = truths[id(volume)]
        return transform(np.zeros(volume.shape, bool) if truth is None else truth)

    return score


def test_oracle_gets_near_perfect_dice(small_set: EvaluationSet) -> None:
    """The truth as residual: near-perfect inside a tumour. It is also the ceiling the shared post-processing
    allows: WMH (a few voxels each on the 2 mm grid), thin parts of lesions and lesions at the cortex (the
    median window reaches outside the eroded mask, where the score is 0) do not survive the 5x5x5 median."""
    result = evaluate_method("oracle", truth_scorer(small_set, lambda t: t.astype(np.float32)), small_set)
    print("\noracle ceiling:", [(c.case, round(c.dice, 2), round(c.auprc, 2)) for c in result.cases])
    tumours = [c for c in result.cases if c.kind == "tumour" and c.polarity == "dark"]
    assert tumours and min(c.dice for c in tumours) > 0.75  # large tumours reach the eroded edge
    assert result.dice > 0.3 and result.validation_dice > 0.3  # the threshold was chosen on validation
    assert result.healthy_fp_ml == 0.0
    assert len(result.cases) == 4 and {c.polarity for c in result.cases} == {"dark", "bright"}


def test_random_scorer_auprc_is_the_prevalence(small_set: EvaluationSet) -> None:
    rng = np.random.default_rng(0)
    result = evaluate_method("random", lambda v, m: rng.random(v.shape).astype(np.float32), small_set)
    prevalences = []
    for case in small_set.test:
        inside = eroded_brain_mask(case.brain_mask)
        prevalences.append(case.lesion_mask[inside].mean())
    assert result.auprc == pytest.approx(np.mean(prevalences), rel=0.5, abs=0.005)
    assert result.auroc == pytest.approx(0.5, abs=0.05)
    assert result.dice < 0.05 and result.validation_dice < 0.1


def test_baselines_table(small_set: EvaluationSet, preprocessor: Preprocessor) -> None:
    mni = preprocessor(brains.mni152_t1())
    rng = np.random.default_rng(0)
    results = [
        evaluate_method("atlas mean (MNI152)", AtlasMeanBaseline([mni.volume]), small_set),
        evaluate_method("intensity", intensity_baseline, small_set),
        evaluate_method("random", lambda v, m: rng.random(v.shape).astype(np.float32), small_set),
    ]
    table = format_table(results)
    print("\n" + table)
    atlas, intensity, random = results
    assert atlas.dice > random.dice + 0.05
    assert atlas.auprc > 2 * random.auprc
    assert intensity.by_polarity["dark"]["dice"] < 0.05  # dark lesions are below healthy tissue: never found
    assert table.count("\n") == 4 and "| atlas mean (MNI152) |" in table
    encoded = json.loads(json.dumps(results_json(results)))
    assert encoded["methods"][0]["method"] == "atlas mean (MNI152)"
    assert set(encoded["methods"][0]["by_polarity"]) == {"dark", "bright"}


def test_colin27_cache_is_reused(
    preprocessor: Preprocessor, colin_cache: Path, colin: tuple[np.ndarray, np.ndarray]
) -> None:
    """A second call with the same cache dir reads the .npz instead of preprocessing (~6 s)."""
    start = time.perf_counter()
    volume, mask = colin27_model_grid(preprocessor, colin_cache)
    assert time.perf_counter() - start < 1.0
    assert len(list(colin_cache.glob("*.npz"))) == 1
    assert np.array_equal(volume, colin[0]) and np.array_equal(mask, colin[1])
