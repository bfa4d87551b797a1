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

# measure -> (direction a positive must have: +1 higher is better, -1 lower is better)
MEASURES = {
    "registration_similarity": +1,
    "mask_agreement": +1,
    "brain_volume_ml": 0,
    "coverage": +1,
    "contrast_margin": +1,
}


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
    print("\nper measure: worst positive vs best negative (among negatives the gate measured)")
    positives = [m.quality for m in measured if m.case.expected == "pass" and m.quality is not None]
    negatives = [m.quality for m in measured if m.case.expected == "fail" and m.quality is not None]
    for name, direction in MEASURES.items():
        pos = [getattr(q, name) for q in positives]
        neg = [getattr(q, name) for q in negatives]
        if direction > 0:
            print(f"  {name:<24} positives >= {min(pos):.3f}   negatives max {max(neg):.3f}")
        else:
            print(f"  {name:<24} positives {min(pos):.0f}-{max(pos):.0f}   negatives {min(neg):.0f}-{max(neg):.0f}")
    gate_ms = [m.gate_seconds * 1000 for m in measured if m.quality is not None]
    print(f"\ngate measures: median {statistics.median(gate_ms):.1f} ms, max {max(gate_ms):.1f} ms per series")
    return 0


if __name__ == "__main__":
    sys.exit(main())
