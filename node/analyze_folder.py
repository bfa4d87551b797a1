"""``uad-node analyze INPUT --out OUT``: the whole pipeline on a folder of DICOM files, offline.

Layout written (what researchers and the tests rely on)::

    OUT/report.json                          {"series": [one entry per series found, selected or not]}
    OUT/<SeriesInstanceUID>/seg.dcm          the BINARY anomaly SEG (seg-score.dcm: FRACTIONAL, if configured)
    OUT/<SeriesInstanceUID>/sr.dcm           the TID 1500 Measurement Report SR: the segment's volume (if configured)
    OUT/<SeriesInstanceUID>/overlays/*.dcm   the Secondary Capture series: 000-summary.dcm, then one per slice
    OUT/<SeriesInstanceUID>/summary.png      the summary image, for a person to look at
    OUT/<SeriesInstanceUID>/notice.dcm       instead of all the above, for a selected series that could not be
    OUT/<SeriesInstanceUID>/notice.png       analysed: the NOT SCREENED Secondary Capture (if configured)

The series selection of the config applies. A series that was selected but could not be analysed
(a broken volume, unreadable pixels, failed registration, refused by the quality gate) gets
``"selected": true, "analysed": false`` with the reason, the gate's measures when it got that far, and no
findings; the run goes on with the other series.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.analysis import Analyser, AnalysisError, write_notice, write_results
from node.config import NodeConfig
from node.results import series_report, write_report
from node.selection import select_series
from node.selection.series import group_by_series

log = logging.getLogger(__name__)


class InputError(Exception):
    """The input cannot be analysed at all (no folder, no DICOM files); the message is one line."""


def analyze_folder(
    folder: Path, out: Path, config: NodeConfig, progress: Callable[[str], None] = log.info
) -> list[dict[str, object]]:
    """Analyse every series in ``folder`` (recursively) and write the layout above; returns the report entries."""
    headers = _read_dicom_headers(folder)
    paths = {id(ds): path for path, ds in headers.items()}
    analyser = Analyser(config.results, config.quality)
    entries: list[dict[str, object]] = []
    for series in group_by_series(headers.values()):
        decision = select_series(series, config.selection)
        if not decision.selected or decision.model is None:
            progress(f"series {series.series_uid}: skipped ({decision.reason})")
            entries.append(series_report(series.series_uid, False, decision.reason, None, None, None, {}))
            continue
        files = [paths[id(ds)] for ds in series.instances]
        try:
            analysis = analyser.analyse(files, decision.model)
        except AnalysisError as exc:
            progress(f"series {series.series_uid}: NOT SCREENED ({exc})")
            if (notice := analyser.not_screened_notice(files, str(exc))) is not None:
                write_notice(notice, out / series.series_uid)
            entries.append(series_report(series.series_uid, True, str(exc), None, None, None, {}, quality=exc.quality))
            continue
        write_results(analysis, out / series.series_uid)
        found = analysis.findings
        progress(
            f"series {series.series_uid}: {found.anomaly_volume_ml:.1f} mL in {found.components} region(s), "
            f"max score {found.max_score:.3f} (threshold {analysis.threshold:.3g})"
        )
        entries.append(analysis.report(decision.reason))
    out.mkdir(parents=True, exist_ok=True)
    write_report(out / "report.json", entries)
    return entries


def _read_dicom_headers(folder: Path) -> dict[Path, Dataset]:
    """Every DICOM file under ``folder`` (headers only); other files are ignored."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    headers: dict[Path, Dataset] = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = Path(root) / name
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue
            if "SeriesInstanceUID" in ds and "SOPInstanceUID" in ds:
                headers[path] = ds
    if not headers:
        raise InputError(f"no DICOM images found in {folder}")
    return headers
