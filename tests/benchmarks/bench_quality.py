"""The quality gate on the QC corpus: every measure of every case, the margin between the worst positive and
the best negative per measure, and what the gate costs per series.

    .venv/bin/python tests/benchmarks/bench_quality.py [--threads N]

Prints one row per case (PASS/FAIL as the default thresholds decide, and whether that is what the case
expects), then per measure the worst positive and the best negative, then timings: the gate's own
measures and the field-of-view map the preprocessing computes for it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.quality import QualityThresholds  # noqa: E402
from tests.qc_corpus import measure_corpus  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="SimpleITK threads (0 = all cores)")
    args = parser.parse_args()
    if args.threads:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    thresholds = QualityThresholds()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure_corpus(Path(tmp))
    print(f"QC corpus: {len(measured)} cases in {time.perf_counter() - started:.0f} s (write, read, preprocess, gate)")
    print(
        f"{'case':<28} {'expect':<6} {'gate':<5} {'sim':>6} {'looks':>5} {'mask':>5} {'vol mL':>7} {'cover':>6} "
        f"{'csf':>5} {'gm':>5} {'wm':>5} {'margin':>6}  reason"
    )
    wrong = 0
    for m in measured:
        problems = m.problems(thresholds)
        verdict = "FAIL" if problems else "PASS"
        wrong += verdict.lower() != m.case.expected
        if m.quality is None:
            print(f"{m.case.name:<28} {m.case.expected:<6} {verdict:<5} {'-':>6}  {problems[0]}")
            continue
        q = m.quality
        t = q.tissue_medians
        print(
            f"{m.case.name:<28} {m.case.expected:<6} {verdict:<5} {q.registration_similarity:6.3f} "
            f"{q.looks_like:>5} {q.mask_agreement:5.3f} {q.brain_volume_ml:7.0f} {q.coverage:6.3f} "
            f"{t['csf']:5.2f} {t['gm']:5.2f} {t['wm']:5.2f} {q.contrast_margin:6.3f}  {'; '.join(problems)}"
        )
    print(f"\n{wrong} case(s) decided against expectation")
    print("\nper check: the worst positive against the best negative meant for it (min threshold in brackets)")
    positives = [m.quality for m in measured if m.case.expected == "pass" and m.quality is not None]
    for check, measure, minimum in (
        ("registration", "registration_similarity", thresholds.min_registration_similarity),
        ("coverage", "coverage", thresholds.min_coverage),
        ("contrast", "contrast_margin", thresholds.min_contrast_margin),
    ):
        negatives = [m for m in measured if m.case.caught_by == check and m.quality is not None]
        worst = min(getattr(q, measure) for q in positives)
        best = max(negatives, key=lambda m: getattr(m.quality, measure))
        refused = sum(1 for m in measured if m.case.caught_by == check and m.quality is None)
        print(
            f"  {measure:<24} positives >= {worst:.3f}, negatives <= {getattr(best.quality, measure):.3f} "
            f"({best.case.name}) [{minimum}]" + (f"; {refused} refused by the registration itself" if refused else "")
        )
    volumes = [q.brain_volume_ml for q in positives]
    others = [m.quality.brain_volume_ml for m in measured if m.case.expected == "fail" and m.quality is not None]
    print(
        f"  {'brain_volume_ml':<24} positives {min(volumes):.0f}-{max(volumes):.0f}, negatives {min(others):.0f}-"
        f"{max(others):.0f} [{thresholds.min_brain_volume_ml:.0f}-{thresholds.max_brain_volume_ml:.0f}]"
    )
    agreement = [q.mask_agreement for q in positives]
    print(
        f"  {'mask_agreement':<24} positives >= {min(agreement):.3f} [{thresholds.min_mask_agreement}]; "
        "no corpus negative has an implausible mask shape (a backstop)"
    )
    for what, ms in (
        ("gate measures", [m.gate_seconds * 1000 for m in measured if m.quality is not None]),
        ("field-of-view map", [m.field_of_view_seconds * 1000 for m in measured if m.quality is not None]),
    ):
        print(f"{what}: median {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms per series")
    return 0


if __name__ == "__main__":
    sys.exit(main())
