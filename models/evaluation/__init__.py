"""Evaluation on held-out Colin27 with simulated lesions: the lesion simulator, the case set (in the evaluated
model's contrast, scaled by its preprocessing version), the paper's metrics, trivial baselines, and a harness
that runs any scorer through the same post-processing.
"""

from models.evaluation.baselines import (
    AtlasMeanBaseline,
    Scorer,
    atlas_mean_baseline,
    intensity_baseline,
    training_atlas_mean,
)
from models.evaluation.cases import (
    EvaluationBrain,
    EvaluationCase,
    EvaluationSet,
    build_evaluation_set,
    colin27_model_grid,
    evaluation_brain,
)
from models.evaluation.harness import (
    CaseResult,
    MethodResult,
    case_result,
    case_score,
    evaluate_method,
    format_table,
    results_json,
)
from models.evaluation.lesions import LESION_KINDS, SimulatedLesion, TissueLevels, lesion_kinds, simulate_lesion
from models.evaluation.metrics import auroc, average_precision, best_threshold, dice, false_positive_ml

__all__ = [
    "LESION_KINDS",
    "AtlasMeanBaseline",
    "CaseResult",
    "EvaluationBrain",
    "EvaluationCase",
    "EvaluationSet",
    "MethodResult",
    "Scorer",
    "SimulatedLesion",
    "TissueLevels",
    "auroc",
    "atlas_mean_baseline",
    "average_precision",
    "best_threshold",
    "build_evaluation_set",
    "case_result",
    "case_score",
    "colin27_model_grid",
    "dice",
    "evaluate_method",
    "evaluation_brain",
    "false_positive_ml",
    "format_table",
    "intensity_baseline",
    "lesion_kinds",
    "results_json",
    "simulate_lesion",
    "training_atlas_mean",
]
