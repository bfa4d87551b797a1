"""The values at which the quality gate refuses a series: plain numbers, importable without the gate's
dependencies (the node's config validates them at start-up)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QualityThresholds:
    """Which measured values refuse a series (``QualityReport.problems``); defaults set on the QC corpus."""

    min_registration_similarity: float = 0.4
    min_mask_agreement: float = 0.8
    min_brain_volume_ml: float = 900.0
    max_brain_volume_ml: float = 2600.0
    min_coverage: float = 0.8
    min_contrast_margin: float = 0.05
    max_anomaly_fraction: float = 0.2
