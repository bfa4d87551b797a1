"""report.json: one machine-readable entry per series of an analysis, selected or not, with the figures the
summary image shows, so researchers and scripts read the same numbers a radiologist sees."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from node.results.findings import Findings, Region


def series_report(
    series_uid: str,
    selected: bool,
    reason: str,
    findings: Findings | None,
    model: str | None,
    threshold: float | None,
    timings_s: dict[str, float],
    largest: Region | None = None,
    *,
    quality: dict | None = None,
    calibration: str | None = None,
) -> dict:
    """One entry of report.json. ``analysed`` is whether the model's findings are in it; figures are null for a
    series that was not analysed (``findings`` None), and ``reason`` then says why. ``quality``: the quality
    gate's measures, when the series reached it (also when it refused the series). ``model``, ``threshold``
    and ``calibration`` (where the threshold comes from: "shipped" or the site rule) default to the findings'
    own when those are given."""
    return {
        "series_uid": series_uid,
        "selected": bool(selected),
        "analysed": findings is not None,
        "reason": reason,
        "model": model if model is not None else (_model(findings) if findings is not None else None),
        "threshold": _number(threshold if threshold is not None else (findings.threshold if findings else None)),
        "calibration": calibration if calibration is not None else (findings.calibration if findings else None),
        "anomaly_volume_ml": _number(findings.anomaly_volume_ml if findings is not None else None),
        "components": findings.components if findings is not None else None,
        "max_score": _number(findings.max_score if findings is not None else None),
        "largest_region": {"volume_ml": _number(largest.volume_ml), "centre_lps": list(largest.centre_lps)}
        if largest is not None
        else None,
        "timings_s": {name: round(float(seconds), 3) for name, seconds in timings_s.items()},
        "quality": quality,
    }


def write_report(path: Path, entries: list[dict]) -> None:
    """Write ``{"series": entries}`` atomically: a reader sees the old report or the new one, never half of one
    (temporary file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"series": entries}, indent=2, allow_nan=False) + "\n"
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _model(findings: Findings) -> str:
    return f"{findings.model_name} {findings.model_version}"


def _number(value: float | None) -> float | None:
    """Rounded for reading (6 significant digits); None for absent or non-finite values (JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")
