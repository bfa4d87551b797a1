"""Evaluation on held-out Colin27 with simulated lesions: the lesion simulator, the case set, the
paper's metrics, trivial baselines, and a harness that runs any scorer through the same post-processing.
"""

from models.evaluation.baselines import AtlasMeanBaseline, Scorer, intensity_baseline
from models.evaluation.cases import EvaluationCase, EvaluationSet, build_evaluation_set, colin27_model_grid
from models.evaluation.harness import (
    CaseResult,
    MethodResult,
    case_result,
    case_score,
    evaluate_method,
    format_table,
    results_json,
)
from models.evaluation.lesions import LESION_KINDS, SimulatedLesion, simulate_lesion
from models.evaluation.metrics import auroc, average_precision, best_threshold, dice, false_positive_ml

__all__ = [
    "LESION_KINDS",
    "AtlasMeanBaseline",
    "CaseResult",
    "EvaluationCase",
    "EvaluationSet",
    "MethodResult",
    "Scorer",
    "SimulatedLesion",
    "auroc",
    "average_precision",
    "best_threshold",
    "build_evaluation_set",
    "case_result",
    "case_score",
    "colin27_model_grid",
    "dice",
    "evaluate_method",
    "false_positive_ml",
    "format_table",
    "intensity_baseline",
    "results_json",
    "simulate_lesion",
]
