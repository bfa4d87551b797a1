"""Series selection: which received series are analysed, with which model, and why.

Input is the instance headers of a series (:class:`SeriesHeaders`; build them
with :func:`group_by_series`, from files with :func:`read_headers`); output is a
:class:`SeriesDecision` whose reason names the rule and value that decided it.
"""

from node.selection.config import SelectionSection
from node.selection.contrast import Contrast, ContrastFinding, classify_contrast
from node.selection.record import decide_stored_series
from node.selection.selector import SeriesDecision, select_series
from node.selection.series import SeriesHeaders, SeriesSummary, Timing, group_by_series, read_headers, summarise

__all__ = [
    "Contrast",
    "ContrastFinding",
    "SelectionSection",
    "SeriesDecision",
    "SeriesHeaders",
    "SeriesSummary",
    "Timing",
    "classify_contrast",
    "decide_stored_series",
    "group_by_series",
    "read_headers",
    "select_series",
    "summarise",
]
