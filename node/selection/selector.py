"""Whether a series is analysed, and why (or why not), in words an admin can act on.

The rules run in this order and the first that fails decides, so a reason
always names one rule and the value that failed it:

1. SOP class in ``sop_classes``; 2. Modality in ``modalities``;
3. no ImageType (or Enhanced MR FrameType) value in ``excluded_image_types``;
4. no name (SeriesDescription, ProtocolName, SequenceName, PulseSequenceName)
   that reads as a localizer or calibration scan (localizer, scout, survey,
   3-plane loc, tripilot, loc, calibration, ASSET cal), for scanners that mark
   them ORIGINAL/PRIMARY;
5. no name matching an ``exclude`` pattern; 6. when ``include`` is not empty, a
   name matching one of its patterns (patterns: case-insensitive ``re.search``);
7. at least ``min_slices`` slices (distinct positions; frames of multi-frame
   instances count);
8. a model configured for the series' contrast class (see
   :mod:`node.selection.contrast`).

The contrast class is found for every series, selected or not, so a skipped
series still records what it was taken for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID

from node.selection.config import SelectionSection
from node.selection.contrast import Contrast, classify_contrast
from node.selection.series import NAME_ATTRIBUTES, SeriesHeaders, SeriesSummary, summarise


@dataclass(frozen=True)
class SeriesDecision:
    """The verdict on one series: analysed or not, the reason either way, its contrast class and model."""

    series_uid: str
    selected: bool
    reason: str
    contrast: Contrast
    model: Path | None  # the checkpoint to run; None when not selected


def select_series(series: SeriesHeaders, config: SelectionSection) -> SeriesDecision:
    """Apply the ``[selection]`` rules to one series (see the module docstring for their order)."""
    summary = summarise(series)
    finding = classify_contrast(summary)
    for rule in _RULES:
        if failure := rule(summary, config):
            return SeriesDecision(summary.series_uid, False, failure, finding.contrast, None)
    model = config.models.get(finding.contrast)
    if model is None:
        reason = f"contrast class {finding.contrast} has no model configured (classified by {finding.reason})"
        return SeriesDecision(summary.series_uid, False, reason, finding.contrast, None)
    reason = f"contrast class {finding.contrast} by {finding.reason}; {summary.slices} slices; model {model}"
    return SeriesDecision(summary.series_uid, True, reason, finding.contrast, model)


def _sop_class(summary: SeriesSummary, config: SelectionSection) -> str | None:
    for uid in summary.sop_class_uids:
        if uid not in config.sop_classes:
            if not uid:
                return "an instance has no SOPClassUID"
            name = UID(uid).name
            named = f"{uid} ({name})" if name != uid else uid
            return f"SOPClassUID {named} is not in sop_classes"
    return None


def _modality(summary: SeriesSummary, config: SelectionSection) -> str | None:
    for modality in summary.modalities:
        if modality not in config.modalities:
            if not modality:
                return "an instance has no Modality"
            return f"Modality {modality} is not in modalities {config.modalities}"
    return None


def _image_type(summary: SeriesSummary, config: SelectionSection) -> str | None:
    excluded = [value for value in summary.image_types if value in config.excluded_image_types]
    return f"ImageType contains {', '.join(excluded)}" if excluded else None


_LOCALIZER = re.compile(
    r"(?<![a-z0-9])(?:locali[sz]er[a-z]*|[a-z]*scout|[a-z]*survey|3[\s_-]*pl(?:ane)?(?:[\s_-]*loc)?|tri[\s_-]*pilot"
    r"|loc|calibration|asset[\s_-]*cal)(?![a-z0-9])",
    re.IGNORECASE,
)


def _localizer(summary: SeriesSummary, config: SelectionSection) -> str | None:
    for attribute, value in summary.names:
        if match := _LOCALIZER.search(value):
            return f"{attribute} '{value}' names a localizer or calibration scan ('{match.group(0)}')"
    return None


def _exclude(summary: SeriesSummary, config: SelectionSection) -> str | None:
    for pattern in config.exclude:
        for attribute, value in summary.names:
            if re.search(pattern, value, re.IGNORECASE):
                return f"{attribute} '{value}' matches exclude pattern '{pattern}'"
    return None


def _include(summary: SeriesSummary, config: SelectionSection) -> str | None:
    if not config.include:
        return None
    if any(re.search(p, value, re.IGNORECASE) for p in config.include for _, value in summary.names):
        return None
    patterns = ", ".join(f"'{pattern}'" for pattern in config.include)
    if not summary.names:
        return f"no {', '.join(NAME_ATTRIBUTES)} to match include patterns {patterns}"
    named = ", ".join(f"{attribute} '{value}'" for attribute, value in summary.names)
    return f"no include pattern ({patterns}) matches {named}"


def _slices(summary: SeriesSummary, config: SelectionSection) -> str | None:
    if summary.slices < config.min_slices:
        return f"{summary.slices} slices < minimum {config.min_slices}"
    return None


_RULES: tuple[Callable[[SeriesSummary, SelectionSection], str | None], ...] = (
    _sop_class,
    _modality,
    _image_type,
    _localizer,
    _exclude,
    _include,
    _slices,
)
