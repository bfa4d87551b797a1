"""Evaluation: metrics against hand-computed values, the lesion simulator on a real Colin27 in each contrast
(unscaled, then scaled by each preprocessing version), the case set the checkpoint decides, the atlas-mean
choice, and the harness (an oracle scorer, a random scorer, the atlas-mean and intensity baselines).

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
from models.checkpoint import Checkpoint
from models.data.volumes import TrainingVolume, atlas_priors
from models.evaluation import (
    LESION_KINDS,
    AtlasMeanBaseline,
    EvaluationBrain,
    EvaluationSet,
    atlas_mean_baseline,
    auroc,
    average_precision,
    best_threshold,
    build_evaluation_set,
    colin27_model_grid,
    dice,
    evaluate_method,
    evaluation_brain,
    false_positive_ml,
    format_table,
    intensity_baseline,
    lesion_kinds,
    results_json,
    simulate_lesion,
)
from models.evaluation.lesions import KINDS_BY_CONTRAST, MIN_VISIBLE_CHANGE, tissue_levels, white_matter
from models.evaluation.painting import paint_tissue
from models.evaluation.run import EvaluationSize, checkpoint_evaluation_set, run_evaluation
from models.preprocessing import Preprocessor
from models.preprocessing.intensity import normalise
from tests import brains
from tests.tiny_model import TINY

ALL_KINDS = [(contrast, kind, polarity) for contrast, kinds in KINDS_BY_CONTRAST.items() for kind, polarity in kinds]


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
    return build_evaluation_set(*colin, seed=0, validation=4, test=4, healthy=1, contrast="t1", version="2")


@pytest.fixture(scope="session")
def contrast_brains(
    preprocessor: Preprocessor, colin_cache: Path, colin: tuple[np.ndarray, np.ndarray]
) -> dict[str, EvaluationBrain]:
    return {contrast: evaluation_brain(preprocessor, colin_cache, contrast) for contrast in KINDS_BY_CONTRAST}


def test_colin27_on_the_model_grid_is_unscaled(colin: tuple[np.ndarray, np.ndarray]) -> None:
    """The cache holds Colin27 before intensity scaling (its own units); each version scales it as it would."""
    volume, mask = colin
    assert volume.shape == mask.shape == (50, 96, 96) and mask.dtype == bool
    assert volume[mask].max() > 2.0  # not a [0, 1] scaled volume
    levels = tissue_levels(volume, mask, "t1")
    assert 0 < levels.csf < levels.gm < levels.wm
    v1 = normalise(volume, mask, "1", "t1")
    assert v1[~mask].max() == 0 and 0.6 < v1[mask].mean() < 0.8 and v1.max() == 1.0


def test_t2_and_flair_brains_have_their_contrasts_tissue_order(
    contrast_brains: dict[str, EvaluationBrain], preprocessor: Preprocessor, colin_cache: Path
) -> None:
    """Judged by the MNI152 tissue priors (independent of the clustering that painted them): T2 CSF > GM > WM,
    FLAIR GM > WM > CSF, T1 WM > GM > CSF; the painted images are fixed (same texture every call) and textured."""
    priors = atlas_priors(preprocessor.geometry)
    order = {"t1": ("wm", "gm", "csf"), "t2": ("csf", "gm", "wm"), "flair": ("gm", "wm", "csf")}
    for contrast, brain in contrast_brains.items():
        assert brain.contrast == contrast and brain.volume.shape == (50, 96, 96)
        means = {
            name: float(brain.volume[brain.brain_mask & (priors[c] > 0.8)].mean())
            for c, name in enumerate(("csf", "gm", "wm"))
        }
        brightest, middle, darkest = order[contrast]
        assert means[brightest] > means[middle] > means[darkest], (contrast, means)
    flair = contrast_brains["flair"]
    again = evaluation_brain(preprocessor, colin_cache, "flair")
    assert np.array_equal(flair.volume, again.volume)
    white = flair.brain_mask & (priors[2] > 0.95)
    assert 0.02 < flair.volume[white].std() / flair.volume[white].mean() < 0.2  # texture, not a flat class mean
    with pytest.raises(ValueError, match="contrast"):
        evaluation_brain(preprocessor, colin_cache, "pd")


def test_every_contrast_has_dark_and_bright_kinds_hyperintense_first_on_t2_and_flair() -> None:
    for contrast in ("t1", "t2", "flair"):
        polarities = [polarity for _, polarity in lesion_kinds(contrast)]
        assert {"dark", "bright"} <= set(polarities)
        if contrast != "t1":
            assert polarities.count("bright") > polarities.count("dark")
    assert lesion_kinds("t1") == LESION_KINDS
    assert ("wmh", "bright") in lesion_kinds("flair") and ("stroke", "bright") in lesion_kinds("flair")
    with pytest.raises(ValueError):
        lesion_kinds("pd")


@pytest.mark.parametrize(("contrast", "kind", "polarity"), ALL_KINDS)
def test_lesion_in_unscaled_space(
    contrast_brains: dict[str, EvaluationBrain], contrast: str, kind: str, polarity: str
) -> None:
    brain = contrast_brains[contrast]
    volume, mask_ = brain.volume, brain.brain_mask
    unit = tissue_levels(volume, mask_, contrast).contrast_unit
    ranges_ml = {"tumour": (5.0, 120.0), "wmh": (0.1, 4.0), "stroke": (2.0, 40.0)}
    for seed in range(3):
        lesion = simulate_lesion(volume, mask_, kind, polarity, np.random.default_rng(seed), contrast)
        again = simulate_lesion(volume, mask_, kind, polarity, np.random.default_rng(seed), contrast)
        assert np.array_equal(lesion.image, again.image) and np.array_equal(lesion.mask, again.mask)
        assert lesion.mask.any() and not lesion.mask[~mask_].any()
        assert lesion.image.min() >= 0 and np.array_equal(lesion.image[~mask_], volume[~mask_])
        low, high = ranges_ml[kind]
        assert low <= lesion.mask.sum() * 0.008 <= high
        change = (lesion.image[lesion.mask].astype(np.float64) - volume[lesion.mask]) / unit
        sign = -1 if polarity == "dark" else 1
        assert sign * change.mean() > 0.2, change.mean()  # the lesion as a whole has its polarity
        assert (sign * change >= MIN_VISIBLE_CHANGE).mean() > 0.55  # most of it visibly so
        outside = np.abs(lesion.image - volume)[~lesion.mask] / unit
        assert outside.mean() < 0.003  # outside the truth only a partial-volume rim changes
        visible = np.abs(lesion.image - volume) >= MIN_VISIBLE_CHANGE * unit
        rim = ndimage.distance_transform_edt(~lesion.mask) <= 1.5
        assert (visible & ~rim).sum() <= 0.01 * lesion.mask.sum() + 10  # visible change = truth + partial volume


def test_a_bright_t1_lesion_stays_bright_under_version_2_and_is_clipped_by_version_1(
    colin: tuple[np.ndarray, np.ndarray],
) -> None:
    """Scaled with the lesion in the volume, as a scan is: version 2 keeps a bright core well above white
    matter and below 1; version 1's 99th percentile clips it (and every bright WMH) at 1.0."""
    volume, brain = colin
    for kind in ("tumour", "wmh"):
        for seed in range(3):
            lesion = simulate_lesion(volume, brain, kind, "bright", np.random.default_rng(seed), "t1")
            raised = lesion.mask & (
                lesion.image - volume >= MIN_VISIBLE_CHANGE * tissue_levels(volume, brain).contrast_unit
            )
            v2 = normalise(lesion.image, brain, "2", "t1")
            wm2 = tissue_levels(normalise(volume, brain, "2", "t1"), brain).wm
            assert np.median(v2[raised]) > wm2 + 0.08 and v2.max() < 1.0
            v1 = normalise(lesion.image, brain, "1", "t1")
            clipped = (v1[raised] == 1.0).mean()
            assert clipped > (0.9 if kind == "wmh" else 0.3), (kind, seed, clipped)


@pytest.mark.parametrize("contrast", ["t2", "flair"])
def test_t2_and_flair_lesions_are_hyperintense_after_scaling(
    contrast_brains: dict[str, EvaluationBrain], contrast: str
) -> None:
    """Bright kinds end above grey matter (FLAIR: above every normal tissue; T2: below fluid) after version-2
    scaling; the dark kind lies below white matter in the scan's own units (the FLAIR cavity also after scaling)."""
    brain = contrast_brains[contrast]
    volume, mask_ = brain.volume, brain.brain_mask
    healthy = tissue_levels(normalise(volume, mask_, "2", contrast), mask_, contrast)
    unscaled_levels = tissue_levels(volume, mask_, contrast)
    for kind, polarity in lesion_kinds(contrast):
        lesion = simulate_lesion(volume, mask_, kind, polarity, np.random.default_rng(1), contrast)
        scaled = normalise(lesion.image, mask_, "2", contrast)
        if polarity == "bright":
            assert np.median(scaled[lesion.mask]) > healthy.gm + 0.03, kind
            if contrast == "t2":
                assert np.median(scaled[lesion.mask]) < healthy.csf, kind
        else:
            darkened = lesion.mask & (lesion.image < volume)
            assert np.median(lesion.image[darkened]) < unscaled_levels.wm, kind
            if contrast == "flair":
                assert np.median(scaled[lesion.mask]) < healthy.wm - 0.1, kind


def test_stroke_reaches_the_cortex(colin: tuple[np.ndarray, np.ndarray]) -> None:
    volume, brain = colin
    depth = ndimage.distance_transform_edt(brain)
    for seed in range(3):
        lesion = simulate_lesion(volume, brain, "stroke", "dark", np.random.default_rng(seed))
        assert depth[lesion.mask].min() <= 2  # touches the brain's outer 4 mm
        assert depth[lesion.mask].max() >= 3  # and reaches into the brain


@pytest.mark.parametrize("contrast", ["t1", "t2", "flair"])
def test_wmh_lie_in_white_matter(contrast_brains: dict[str, EvaluationBrain], contrast: str) -> None:
    brain = contrast_brains[contrast]
    wm = ndimage.binary_dilation(white_matter(brain.volume, brain.brain_mask, contrast=contrast), iterations=1)
    for _, polarity in [k for k in lesion_kinds(contrast) if k[0] == "wmh"]:
        lesion = simulate_lesion(brain.volume, brain.brain_mask, "wmh", polarity, np.random.default_rng(1), contrast)
        assert wm[lesion.mask].mean() > 0.95
        assert ndimage.label(lesion.mask)[1] >= 2


def test_evaluation_set_is_balanced_disjoint_and_varied(small_set: EvaluationSet) -> None:
    kinds = [(c.kind, c.polarity) for c in small_set.validation + small_set.test]
    assert set(kinds) == set(LESION_KINDS)
    assert small_set.contrast == "t1" and small_set.scaling == "2"
    assert small_set.healthy[0].lesion_mask is None
    a, b = small_set.validation[0], small_set.test[1]  # both dark tumours, from different streams
    assert (a.kind, a.polarity) == (b.kind, b.polarity) and not np.array_equal(a.lesion_mask, b.lesion_mask)
    healthy = small_set.healthy[0]
    away = healthy.brain_mask & ~small_set.test[0].lesion_mask
    assert 0.002 < np.abs(healthy.volume - small_set.test[0].volume)[away].mean() < 0.05  # noise and bias differ
    for case in small_set.validation + small_set.test + small_set.healthy:
        assert case.volume[~case.brain_mask].max() == 0 and 0 <= case.volume.min() and case.volume.max() < 1


def test_evaluation_set_is_deterministic_per_seed_and_scaled_by_the_version(
    colin: tuple[np.ndarray, np.ndarray],
) -> None:
    """Same seed, same cases; another seed, other cases. Versions see the same lesions (same truth), each
    scaled its way: version 1 clips at its 99th percentile (~1 % of the brain at exactly 1.0), version 2 never."""
    options = {"validation": 1, "test": 1, "healthy": 1, "contrast": "t1"}
    first = build_evaluation_set(*colin, seed=3, version="1", **options)
    same = build_evaluation_set(*colin, seed=3, version="1", **options)
    other = build_evaluation_set(*colin, seed=4, version="1", **options)
    v2 = build_evaluation_set(*colin, seed=3, version="2", **options)
    assert first.scaling == "1" and v2.scaling == "2"
    for a, b, c, d in zip(
        first.validation + first.test + first.healthy,
        same.validation + same.test + same.healthy,
        other.validation + other.test + other.healthy,
        v2.validation + v2.test + v2.healthy,
        strict=True,
    ):
        assert a.name == b.name == c.name == d.name
        assert np.array_equal(a.volume, b.volume) and not np.array_equal(a.volume, c.volume)
        if a.lesion_mask is not None:
            assert np.array_equal(a.lesion_mask, d.lesion_mask) and not np.array_equal(a.lesion_mask, c.lesion_mask)
        at_one = (a.volume[a.brain_mask] == 1.0).mean()
        assert 0.003 < at_one < 0.03 and d.volume.max() < 1.0


def _checkpoint(contrast: str, version: str) -> Checkpoint:
    """Metadata only: what the evaluation set is decided by (no weights are needed to build it)."""
    return Checkpoint(
        config=TINY, ema_weights={}, training={"data": {"contrast": contrast}}, preprocessing_version=version
    )


def test_the_checkpoint_decides_the_evaluation_set(
    colin_cache: Path, contrast_brains: dict[str, EvaluationBrain]
) -> None:
    """A version-1 FLAIR checkpoint gets painted-FLAIR Colin27 with FLAIR lesions, scaled by version 1."""
    size = EvaluationSize(validation=1, test=2, healthy=1, seed=5)
    chosen = checkpoint_evaluation_set(_checkpoint("flair", "1"), size, colin_cache)
    flair = contrast_brains["flair"]
    expected = build_evaluation_set(flair.volume, flair.brain_mask, 5, 1, 2, 1, contrast="flair", version="1")
    assert (chosen.contrast, chosen.scaling) == ("flair", "1")
    assert [c.name for c in chosen.test] == ["test-00-wmh-bright", "test-01-stroke-bright"]
    for a, b in zip(
        chosen.validation + chosen.test + chosen.healthy,
        expected.validation + expected.test + expected.healthy,
        strict=True,
    ):
        assert np.array_equal(a.volume, b.volume)


def test_an_unconditioned_model_of_other_preprocessing_is_refused(colin_cache: Path) -> None:
    with pytest.raises(ValueError, match="same cases"):
        run_evaluation(_checkpoint("t1", "1"), "offline", colin_cache, EvaluationSize(1, 1, 0), _checkpoint("t1", "2"))


# ---- the atlas-mean baseline's training brains -------------------------------------------------------


def _training_volume(name: str, contrast: str | None, value: float, scaling: str = "2") -> TrainingVolume:
    """A 2x4x4 'brain': CSF, GM and WM slabs; the image a constant (what matters is which volumes are averaged)."""
    tissue = np.zeros((3, 2, 4, 4), dtype=np.float32)
    tissue[0, :, 0], tissue[1, :, 1:3], tissue[2, :, 3] = 1.0, 1.0, 1.0
    volume = np.full((2, 4, 4), value, dtype=np.float32)
    return TrainingVolume(name, volume, np.ones((2, 4, 4), bool), tissue, contrast, scaling)


def test_atlas_mean_averages_the_brains_acquired_in_the_models_contrast() -> None:
    volumes = [
        _training_volume("a", "t1", 0.2),
        _training_volume("b", "t1", 0.4),
        _training_volume("c", "t2", 0.9),
        _training_volume("tpm", None, 0.7),
    ]
    name, baseline = atlas_mean_baseline(volumes, "t1", "2")
    assert name == "atlas-mean (2 training brains)" and np.allclose(baseline.mean, 0.3)
    name, baseline = atlas_mean_baseline(volumes, "t2", "2")
    assert name == "atlas-mean (1 training brains)" and np.allclose(baseline.mean, 0.9)
    with pytest.raises(ValueError, match="version"):
        atlas_mean_baseline([_training_volume("a", "t1", 0.2, scaling="1")], "t1", "2")


def test_atlas_mean_for_flair_paints_the_training_tissue() -> None:
    """No FLAIR was acquired: every brain with tissue maps, painted at the evaluation's means and scaled."""
    volumes = [_training_volume("a", "t1", 0.2), _training_volume("c", "t2", 0.9)]
    name, baseline = atlas_mean_baseline(volumes, "flair", "2")
    assert name == "atlas-mean (2 training brains painted as flair)"
    painted = normalise(paint_tissue(volumes[0].tissue, "flair", texture=False), volumes[0].brain_mask, "2", "flair")
    assert np.allclose(baseline.mean, painted)
    csf, gm, wm = baseline.mean[0, 0, 0], baseline.mean[0, 1, 0], baseline.mean[0, 3, 0]
    assert gm > wm > csf  # FLAIR's order, whatever the brains were acquired in
    no_tissue = TrainingVolume("x", volumes[0].volume, volumes[0].brain_mask, None, "t1")
    with pytest.raises(ValueError, match="tissue"):
        atlas_mean_baseline([no_tissue], "flair", "2")


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


@pytest.mark.timeout(300)  # MNI152 preprocessed and 9 volumes scored three ways: ~70 s on a busy machine
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
    """A second call with the same cache dir reads the .npz instead of preprocessing (~6 s), whatever the
    preprocessing version (it holds the volume before scaling); only a T1 preprocessor registers Colin27."""
    from models.atlas import load_mni152_atlas

    start = time.perf_counter()
    volume, mask = colin27_model_grid(preprocessor, colin_cache)
    assert time.perf_counter() - start < 1.0
    assert np.array_equal(volume, colin[0]) and np.array_equal(mask, colin[1])
    atlas = load_mni152_atlas()
    version_1, _ = colin27_model_grid(Preprocessor(atlas, version="1"), colin_cache)
    assert np.array_equal(version_1, volume)
    assert len(list(colin_cache.glob("*.npz"))) == 1
    with pytest.raises(ValueError, match="T1"):
        colin27_model_grid(Preprocessor(atlas, contrast="t2"), colin_cache)
