"""The quality gate's checks on the QC corpus (``tests.qc_corpus``): real heads in every geometry pass, and each
failure case is refused by the check meant to catch it.

Each case is written as DICOM, read by the node's volume reader, preprocessed with its model's contrast and
measured, as ``node.analysis`` does. The whole corpus takes a few minutes on two cores, so by default a subset
runs that still holds one case per check; ``UAD_QC_FULL=1`` runs every case (the README's figures come from
``tests/benchmarks/bench_quality.py``, which always measures every case).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from models.quality import QualityThresholds
from models.quality.gate import QualityReport
from tests.qc_corpus import Measured, measure_corpus, qc_cases

# The module fixture registers every case (8 of them, ~90 s alone on two cores; more beside a second test worker).
pytestmark = pytest.mark.timeout(600)

FULL = os.environ.get("UAD_QC_FULL") == "1"
SUBSET = {
    "itk-head",
    "colin27-oblique15",
    "colin27-axial5mm",
    "colin27-t2like-as-t2",
    "colin27-flairlike-as-flair",
    "phantom",
    "rows-flipped",
    "mid-slab",
    "t2like-as-t1",
}
CASES = [case for case in qc_cases() if FULL or case.name in SUBSET]
# The words a refusal by each check starts with (the registration's own refusal: "... is implausible").
REFUSED_BY = {
    "registration": ("registration to the atlas failed", "preprocessing failed: registration to the atlas is"),
    "coverage": ("the field of view covers",),
    "contrast": ("tissue contrast is not",),
}
THRESHOLDS = QualityThresholds()


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Measured]:
    return {m.case.name: m for m in measure_corpus(tmp_path_factory.mktemp("qc"), CASES)}


def test_the_corpus_has_a_failure_case_for_every_check() -> None:
    assert {case.caught_by for case in qc_cases() if case.expected == "fail"} == set(REFUSED_BY)
    assert all(case.caught_by == "" for case in qc_cases() if case.expected == "pass")


@pytest.mark.parametrize("case", [c for c in CASES if c.expected == "pass"], ids=lambda c: c.name)
def test_a_real_head_passes_every_check(measured: dict[str, Measured], case: object) -> None:
    m = measured[case.name]  # type: ignore[attr-defined]
    assert m.quality is not None, m.refused
    assert m.problems(THRESHOLDS) == []
    assert m.quality.looks_like == m.case.contrast.lower()  # the template of its own contrast fits best
    assert m.quality.coverage > 0.99 and 1000 < m.quality.brain_volume_ml < 2200
    assert m.gate_seconds < 1.0


@pytest.mark.parametrize("case", [c for c in CASES if c.expected == "fail"], ids=lambda c: c.name)
def test_a_failure_case_is_refused_by_the_check_meant_for_it(measured: dict[str, Measured], case: object) -> None:
    m = measured[case.name]  # type: ignore[attr-defined]
    problems = m.problems(THRESHOLDS)
    assert any(problem.startswith(REFUSED_BY[m.case.caught_by]) for problem in problems), problems


def test_values_are_recorded_as_plain_numbers(measured: dict[str, Measured]) -> None:
    report = measured["colin27-oblique15"].quality.as_dict()
    assert set(report) == {
        "contrast", "registration_similarity", "looks_like", "similarity_by_contrast", "mask_agreement",
        "brain_volume_ml", "coverage", "tissue_medians", "contrast_margin", "seconds", "anomaly_fraction",
    }  # fmt: skip
    assert report["contrast"] == "t1" and report["anomaly_fraction"] is None
    assert set(report["tissue_medians"]) == {"csf", "gm", "wm"}
    assert report["tissue_medians"]["wm"] > report["tissue_medians"]["gm"] > report["tissue_medians"]["csf"]


def test_a_partial_field_of_view_is_left_out_of_the_brain_mask(measured: dict[str, Measured]) -> None:
    """The mid-brain slab registers (its anatomy is real) but covers a third of the slab the model screens:
    the uncovered model voxels leave the brain mask instead of reading as dark anomalies, so the mask still
    agrees with the covered part of the atlas brain."""
    slab = measured["mid-slab"].quality
    assert slab is not None
    assert 0.2 < slab.coverage < 0.5
    assert slab.registration_similarity >= THRESHOLDS.min_registration_similarity
    assert slab.mask_agreement > 0.9


def report_with(anomalous: float) -> QualityReport:
    return QualityReport(
        contrast="t1", registration_similarity=0.65, looks_like="t1", similarity_by_contrast={"t1": 0.65},
        mask_agreement=0.98, brain_volume_ml=1800.0, coverage=1.0, tissue_medians={"csf": 0.1, "gm": 0.6, "wm": 0.9},
        contrast_margin=0.3, seconds=0.01, anomaly_fraction=anomalous,
    )  # fmt: skip


def test_an_answer_flooding_the_brain_is_implausible() -> None:
    brain = np.zeros((10, 10, 10), bool)
    brain[2:8, 2:8, 2:8] = True  # 216 voxels
    mask = np.zeros_like(brain)
    mask[2:8, 2:8, 2:4] = True  # 72 voxels: a third
    flooded = report_with(0.0).with_answer(mask, brain)
    assert flooded.anomaly_fraction == pytest.approx(1 / 3)
    assert "implausible answer: 33% of the brain anomalous" in (flooded.answer_problem(THRESHOLDS) or "")
    mask[:] = False
    mask[4, 4, 4:6] = True
    assert report_with(0.0).with_answer(mask, brain).answer_problem(THRESHOLDS) is None
    assert report_with(0.0).problems(THRESHOLDS) == []  # the answer is not a pre-inference check
