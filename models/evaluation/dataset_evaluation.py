"""``uad-node evaluate --dataset DIR``: a checkpoint on a labelled dataset (BraTS, ATLAS-style pairs, DICOM + SEG),
by the paper's protocol, measured on each case's own grid.

Every case is preprocessed once and scored by each method (the model, and with ``baselines`` the atlas-mean
and intensity rows). The threshold is chosen on validation cases as in the built-in evaluation (greedy search
for the best mean Dice on the model grid, ``metrics.best_threshold``): ``validation`` cases by a seeded
shuffle (default a fifth, at least one), or ``folds`` K-fold cross-validation (each fold tested at the
threshold chosen on the other folds; means over all test cases), or a fixed ``threshold``. Test figures are
then measured where the label was drawn: the segmentation brought back to the case's grid exactly as the
node builds its SEG (``scoring.native_mask``), so the Dice reported is the Dice of the prediction file
written for the case. AUPRC and AUROC use the score map on that grid inside the case's brain mask. Healthy
scans (``healthy``) give the false-positive volume at the threshold.

A case that cannot be read or preprocessed is reported in ``skipped`` with its reason; the run goes on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from models.anomaly_map import eroded_brain_mask
from models.evaluation.baselines import Scorer
from models.evaluation.datasets import DatasetCase, DatasetError, find_dataset, find_healthy, load_case
from models.evaluation.harness import json_safe
from models.evaluation.metrics import auroc, average_precision, best_threshold, dice
from models.evaluation.scoring import PreparedVolume, ScoredVolume, native_mask, native_score, prepare_volume, volume_ml
from models.evaluation.scoring import score_volume as score_with
from models.preprocessing import PreprocessingError, Preprocessor

VALIDATION_SHARE = 0.2  # the default validation split when neither a count, folds nor a threshold is given


@dataclass(frozen=True)
class Protocol:
    """How the threshold is chosen: ``threshold`` fixed, else ``folds`` > 1, else ``validation`` cases."""

    validation: int | None = None
    folds: int | None = None
    threshold: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class CaseFigures:
    """One case's figures on its own grid (the JSON contract's case entry, plus its fold and threshold)."""

    id: str
    split: str  # "validation" | "test"
    dice: float
    auprc: float
    auroc: float
    lesion_ml: float
    predicted_ml: float
    threshold: float
    fold: int | None = None


@dataclass(frozen=True)
class MethodFigures:
    """A method's threshold, its cases, and the means over test cases (and healthy scans)."""

    method: str
    threshold: float  # with folds: the mean of the folds' thresholds
    cases: list[CaseFigures]
    healthy_fp_ml: list[float]
    fold_thresholds: list[float] = field(default_factory=list)

    @property
    def mean(self) -> dict[str, float | None]:
        test = [c for c in self.cases if c.split == "test"]
        return {
            "dice": _mean([c.dice for c in test]),
            "auprc": _mean([c.auprc for c in test]),
            "auroc": _mean([c.auroc for c in test]),
            "healthy_fp_ml": _mean(self.healthy_fp_ml) if self.healthy_fp_ml else None,
        }


@dataclass(frozen=True)
class DatasetEvaluation:
    """Everything ``--json`` writes: the model's figures first, then the baselines'."""

    checkpoint: str
    layout: str
    modality: str
    methods: list[MethodFigures]
    skipped: list[dict[str, str]]
    volumes: int
    seconds: float

    def json(self) -> dict:
        """The ``--json`` contract: the model's threshold, cases and means at the top level."""
        model = self.methods[0]
        return json_safe(
            {
                "checkpoint": self.checkpoint,
                "method": model.method,
                "threshold": model.threshold,
                "layout": self.layout,
                "modality": self.modality,
                "cases": [asdict(c) for c in model.cases],
                "mean": model.mean,
                "skipped": self.skipped,
                "folds": [{"fold": k, "threshold": t} for k, t in enumerate(model.fold_thresholds)],
                "healthy_fp_ml": model.healthy_fp_ml,
                "baselines": [{"method": m.method, "threshold": m.threshold, "mean": m.mean} for m in self.methods[1:]],
                "volumes_per_minute": 60.0 * self.volumes / self.seconds if self.seconds else None,
            }
        )


def evaluate_dataset(
    folder: Path,
    methods: Sequence[tuple[str, Scorer]],
    preprocessor: Preprocessor,
    protocol: Protocol,
    *,
    checkpoint: str,
    layout: str = "auto",
    modality: str = "t1",
    healthy: Path | None = None,
    predictions: Path | None = None,
    progress: Callable[[str], None] = print,
) -> DatasetEvaluation:
    """Evaluate each of ``methods`` (the model first) on the dataset in ``folder``; see the module docstring.

    Raises DatasetError when the dataset itself cannot be used (no cases found, ambiguous layout, too few
    readable cases for the protocol).
    """
    started = time.perf_counter()
    layout, cases = find_dataset(folder, layout, modality)
    skipped: list[dict[str, str]] = []
    prepared = prepare_all(cases, preprocessor, skipped, progress, "case")
    if not prepared:
        raise DatasetError(f"{folder}: none of the {len(cases)} cases could be read ({skipped[0]['reason']})")
    clean = prepare_all(find_healthy(healthy), preprocessor, skipped, progress, "healthy scan") if healthy else []
    results = []
    for name, scorer in methods:
        scored = [score_with(scorer, volume) for volume in prepared]
        healthy_scored = [score_with(scorer, volume) for volume in clean]
        figures = _figures(name, scored, healthy_scored, protocol)
        progress(f"{name}: threshold {figures.threshold:.4g}, " + _summary(figures.mean))
        results.append(figures)
        if predictions is not None and len(results) == 1:
            _write_predictions(predictions, scored, figures)
    seconds = time.perf_counter() - started
    return DatasetEvaluation(
        checkpoint=checkpoint,
        layout=layout,
        modality=modality,
        methods=results,
        skipped=skipped,
        volumes=len(prepared) + len(clean),
        seconds=seconds,
    )


def format_dataset_table(evaluation: DatasetEvaluation) -> str:
    """A markdown table, one row per method: Dice/AUPRC/AUROC as % over test cases, healthy FP in mL."""
    header = "| method | threshold | Dice | AUPRC | AUROC | healthy FP mL | test cases |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for m in evaluation.methods:
        mean, tested = m.mean, sum(1 for c in m.cases if c.split == "test")
        fp = "n/a" if mean["healthy_fp_ml"] is None else f"{mean['healthy_fp_ml']:.1f}"
        cells = [m.method, f"{m.threshold:.4g}", _pct(mean["dice"]), _pct(mean["auprc"]), _pct(mean["auroc"]), fp]
        lines.append("| " + " | ".join([*cells, str(tested)]) + " |")
    return "\n".join(lines)


def prepare_all(
    cases: list[DatasetCase],
    preprocessor: Preprocessor,
    skipped: list[dict[str, str]],
    progress: Callable[[str], None],
    what: str,
) -> list[PreparedVolume]:
    """Each case read and preprocessed; one that cannot be is added to ``skipped`` with its reason, not raised."""
    prepared = []
    for index, case in enumerate(cases, start=1):
        try:
            image, label = load_case(case)
            prepared.append(prepare_volume(preprocessor, image, label, case.id))
            progress(f"[{index}/{len(cases)}] {what} {case.id}")
        except (DatasetError, PreprocessingError) as exc:
            skipped.append({"id": case.id, "reason": str(exc)})
            progress(f"[{index}/{len(cases)}] {what} {case.id}: skipped ({exc})")
    return prepared


def _figures(name: str, scored: list[ScoredVolume], healthy: list[ScoredVolume], protocol: Protocol) -> MethodFigures:
    """Thresholds by the protocol, then each case's figures on its own grid."""
    order = np.random.default_rng(protocol.seed).permutation(len(scored))
    if protocol.threshold is not None:
        splits = [(float(protocol.threshold), [], list(order), None)]
    elif protocol.folds and protocol.folds > 1:
        if protocol.folds > len(scored):
            raise DatasetError(f"{protocol.folds} folds need at least as many readable cases; {len(scored)} were read")
        folds = np.array_split(order, protocol.folds)
        splits = []
        for k, fold in enumerate(folds):
            others = [i for j, f in enumerate(folds) if j != k for i in f]
            splits.append((_threshold([scored[i] for i in others]), [], list(fold), k))
    else:
        count = protocol.validation or max(1, round(VALIDATION_SHARE * len(scored)))
        if count >= len(scored):
            raise DatasetError(f"{count} validation cases leave no test case among the {len(scored)} read")
        validation, test = list(order[:count]), list(order[count:])
        splits = [(_threshold([scored[i] for i in validation]), validation, test, None)]
    cases = []
    for threshold, validation, test, fold in splits:
        cases += [_case(scored[i], "validation", threshold, fold) for i in validation]
        cases += [_case(scored[i], "test", threshold, fold) for i in test]
    thresholds = [t for t, _, _, _ in splits]
    threshold = float(np.mean(thresholds))
    return MethodFigures(
        method=name,
        threshold=threshold,
        cases=sorted(cases, key=lambda c: c.id),
        healthy_fp_ml=[volume_ml(native_mask(h, threshold)) for h in healthy],
        fold_thresholds=thresholds if len(splits) > 1 else [],
    )


def _threshold(validation: list[ScoredVolume]) -> float:
    truths = [s.volume.truth for s in validation]
    if any(t is None for t in truths):
        raise DatasetError("every validation case needs a label")
    masks = [eroded_brain_mask(s.prepared.brain_mask) for s in validation]
    return best_threshold([s.score for s in validation], truths, masks)  # type: ignore[arg-type]


def _case(scored: ScoredVolume, split: str, threshold: float, fold: int | None) -> CaseFigures:
    """Dice of the segmentation on the case's grid against its label; AUPRC/AUROC of the score in its brain."""
    label = scored.volume.label
    assert label is not None  # dataset cases always carry one (load_case)
    prediction = native_mask(scored, threshold)
    truth = sitk.GetArrayViewFromImage(label) > 0
    brain = sitk.GetArrayViewFromImage(scored.prepared.input_brain_mask) > 0
    score = sitk.GetArrayFromImage(native_score(scored))
    return CaseFigures(
        id=scored.volume.id,
        split=split,
        dice=dice(sitk.GetArrayViewFromImage(prediction) > 0, truth),
        auprc=average_precision(score[brain], truth[brain]),
        auroc=auroc(score[brain], truth[brain]),
        lesion_ml=volume_ml(label),
        predicted_ml=volume_ml(prediction),
        threshold=threshold,
        fold=fold,
    )


def _write_predictions(folder: Path, scored: list[ScoredVolume], figures: MethodFigures) -> None:
    """``<id>_pred.nii.gz`` (the mask the figures were measured on) and ``<id>_score.nii.gz`` per case."""
    folder.mkdir(parents=True, exist_ok=True)
    thresholds = {c.id: c.threshold for c in figures.cases}
    for s in scored:
        sitk.WriteImage(native_mask(s, thresholds[s.volume.id]), str(folder / f"{s.volume.id}_pred.nii.gz"), True)
        sitk.WriteImage(native_score(s), str(folder / f"{s.volume.id}_score.nii.gz"), True)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _summary(mean: dict[str, float | None]) -> str:
    return ", ".join(f"{key} {value:.3f}" for key, value in mean.items() if value is not None)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"
