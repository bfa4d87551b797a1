"""Results back to PACS: the anomaly SEG, Secondary Capture overlays and summary, the measurement SR, and
report.json; a NOT SCREENED Secondary Capture for a selected series that could not be analysed.

Every object belongs to the source study, lives in a new series with new UIDs on every build, references
the source images it was computed from, and is marked research use only.
"""

from node.results.findings import Findings, Region, findings_from, largest_region
from node.results.notice import build_not_screened_notice
from node.results.overlays import build_overlays
from node.results.report import series_report, write_report
from node.results.seg import build_segmentation, build_segmentations
from node.results.sr import build_measurement_report
from node.results.summary import build_secondary_captures, build_summary

__all__ = [
    "Findings",
    "Region",
    "build_measurement_report",
    "build_not_screened_notice",
    "build_overlays",
    "build_secondary_captures",
    "build_segmentation",
    "build_segmentations",
    "build_summary",
    "findings_from",
    "largest_region",
    "series_report",
    "write_report",
]
