"""One selected series through the whole pipeline: DICOM files -> volume -> model grid -> anomaly map ->
findings on the series' own grid -> SEG, Secondary Capture and SR objects.

``Analyser`` loads what is expensive once per process (the atlas and its registration target, ~2 s;
each checkpoint, on first use) and is then reused for every series, by ``uad-node analyze`` and by the
node's job workers alike. Every failure the input can cause is an ``AnalysisError`` whose message is
the one-line reason recorded for the series; that includes the quality gate (``models.quality``), which
refuses an input the model cannot judge before inference and an implausible answer after it. The gate's
measures travel with the analysis or with the error, so they are recorded either way.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from node.config import QualitySection, ResultsSection
from node.results import (
    Findings,
    Region,
    build_measurement_report,
    build_not_screened_notice,
    build_secondary_captures,
    build_segmentations,
    findings_from,
    largest_region,
    series_report,
)
from node.volume import VolumeRejected, series_to_volume
from node.volume.assemble import Instance

if TYPE_CHECKING:  # imported lazily at run time: torch and nilearn take seconds to import
    from models.atlas import Atlas
    from models.checkpoint import Checkpoint
    from models.detector import AnomalyDetector
    from models.preprocessing import Preprocessor
    from models.quality.gate import QualityGate, QualityReport


class AnalysisError(Exception):
    """The series cannot be analysed; the message says why in one line. ``quality``: the gate's measures,
    when the series got that far."""

    def __init__(self, reason: str, quality: dict | None = None) -> None:
        super().__init__(reason)
        self.quality = quality


@dataclass(frozen=True, eq=False)
class SeriesAnalysis:
    """What one analysed series produced, ready to be written or sent."""

    series_uid: str
    findings: Findings
    segmentations: list[Dataset]  # the BINARY SEG (and the FRACTIONAL score SEG when configured)
    secondary_captures: list[Dataset]  # the summary first, then the overlays, one SC series
    measurement_report: Dataset | None  # the TID 1500 SR measuring the SEG's segment, when configured
    summary_png: bytes
    largest: Region | None  # the biggest connected finding, placed in patient coordinates
    model: str
    threshold: float
    timings_s: dict[str, float]  # volume, preprocessing, quality, inference, objects
    quality: dict  # the quality gate's measures (``QualityReport.as_dict``)

    def report(self, reason: str) -> dict:
        """The series' report.json entry (``reason``: why it was selected)."""
        return series_report(
            self.series_uid,
            True,
            reason,
            self.findings,
            self.model,
            self.threshold,
            self.timings_s,
            self.largest,
            quality=self.quality,
        )


class Analyser:
    """The pipeline with its expensive parts loaded once (see the module docstring)."""

    def __init__(self, results: ResultsSection, quality: QualitySection | None = None) -> None:
        self._results = results
        self._quality = quality or QualitySection()
        self._atlas: Atlas | None = None
        # by the model's contrast (its registration template) and preprocessing version (its intensity scaling)
        self._preprocessors: dict[tuple[str, str], Preprocessor] = {}
        self._gate: QualityGate | None = None
        self._detectors: dict[Path, AnomalyDetector] = {}
        self._loading = threading.Lock()  # several job workers share one Analyser

    def analyse(
        self, instances: Sequence[Instance], checkpoint: Path, on_stage: Callable[[str], None] = lambda stage: None
    ) -> SeriesAnalysis:
        """Analyse the instances of one series with the model in ``checkpoint``; raises AnalysisError.

        ``on_stage("inferring")`` is called before the model runs and ``on_stage("exporting")`` after it
        (the node's job states); whatever it raises ends the analysis there.
        """
        from models.preprocessing import PreprocessingError, mask_to_input_grid, to_input_grid

        detector = self._detector(checkpoint)  # loading a model on first use is not a stage of this series
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = round(now - clock, 3)
            clock = now

        try:
            volume = series_to_volume(instances)
        except VolumeRejected as exc:
            raise AnalysisError(str(exc)) from exc
        lap("volume")
        contrast = detector.checkpoint.contrast
        preprocessor, gate = self._prepare(detector.checkpoint)
        try:
            prepared = preprocessor(volume.image)
        except PreprocessingError as exc:
            raise AnalysisError(f"preprocessing failed: {exc}") from exc
        lap("preprocessing")
        quality = gate.measure(prepared, contrast)
        self._refuse(quality.problems(self._quality.thresholds()), quality)
        lap("quality")
        on_stage("inferring")
        clock = time.perf_counter()
        result = detector.analyse(prepared.volume, prepared.brain_mask)
        quality = quality.with_answer(result.mask, prepared.brain_mask)
        lap("inference")
        if problem := quality.answer_problem(self._quality.thresholds()):
            self._refuse([problem], quality)
        on_stage("exporting")
        clock = time.perf_counter()
        mask = sitk.GetArrayFromImage(mask_to_input_grid(result.mask, prepared)) > 0
        score = sitk.GetArrayFromImage(to_input_grid(result.score, prepared, "linear")).astype(np.float32)
        name = f"cDDPM {detector.checkpoint.config.name}"
        findings = findings_from(
            mask,
            score,
            result.threshold,
            name,
            detector.version,
            volume.image.GetSpacing(),
            calibration=detector.checkpoint.calibration_label,
        )
        sources = _headers(instances)
        segmentations = build_segmentations(volume, sources, findings, self._results)
        report = (
            build_measurement_report(segmentations[0], sources, findings, self._results)
            if self._results.structured_report
            else None
        )
        lap("objects")
        captures, png = build_secondary_captures(volume, sources, findings, timings, self._results)
        timings["objects"] = round(timings["objects"] + time.perf_counter() - clock, 3)
        return SeriesAnalysis(
            series_uid=volume.series_instance_uid,
            findings=findings,
            segmentations=segmentations,
            secondary_captures=captures,
            measurement_report=report,
            summary_png=png,
            largest=largest_region(findings, volume.image),
            model=f"{name} {detector.version}",
            threshold=result.threshold,
            timings_s=timings,
            quality=quality.as_dict(),
        )

    def not_screened_notice(self, instances: Sequence[Instance], reason: str) -> tuple[Dataset, bytes] | None:
        """The NOT SCREENED Secondary Capture for a selected series that could not be analysed (and its PNG), or
        None when ``results.not_screened_notice`` is off. Needs only the headers: the pixels may be unreadable."""
        if not self._results.not_screened_notice:
            return None
        return build_not_screened_notice(_headers(instances), reason, self._results)

    def load(self, checkpoint: Path) -> None:
        """Load the atlas and the model in ``checkpoint`` now rather than on first use; AnalysisError if unusable."""
        self._prepare(self._detector(checkpoint).checkpoint)

    def _refuse(self, problems: list[str], quality: QualityReport) -> None:
        """Raise the gate's refusal (the measures go with it), unless the gate is off or had nothing to say."""
        if problems and self._quality.enabled:
            raise AnalysisError("quality gate: " + "; ".join(problems), quality=quality.as_dict())

    def _prepare(self, checkpoint: Checkpoint) -> tuple[Preprocessor, QualityGate]:
        from models.atlas import load_mni152_atlas
        from models.quality.gate import QualityGate

        key = (checkpoint.contrast, checkpoint.preprocessing_version)
        with self._loading:
            if self._atlas is None:
                self._atlas = load_mni152_atlas()
            if key not in self._preprocessors:
                self._preprocessors[key] = checkpoint.preprocessor(self._atlas)
            if self._gate is None:
                self._gate = QualityGate(self._atlas, self._preprocessors[key].geometry)
            return self._preprocessors[key], self._gate

    def _detector(self, checkpoint: Path) -> AnomalyDetector:
        from models.checkpoint import CheckpointError
        from models.detector import AnomalyDetector

        with self._loading:
            if checkpoint not in self._detectors:
                try:
                    detector = AnomalyDetector.from_file(checkpoint)
                except CheckpointError as exc:
                    raise AnalysisError(str(exc)) from exc
                if detector.checkpoint.threshold is None:
                    raise AnalysisError(
                        f"{checkpoint}: no calibrated threshold (ship it with `uad-node evaluate --ship`)"
                    )
                self._detectors[checkpoint] = detector
            return self._detectors[checkpoint]


def write_results(analysis: SeriesAnalysis, folder: Path) -> list[Path]:
    """Write the objects and summary.png under ``folder`` durably; returns the DICOM files.

    Layout: ``seg.dcm`` (``seg-score.dcm``), ``sr.dcm`` (when configured), ``overlays/000-summary.dcm`` then
    ``overlays/NNN-slice.dcm``, ``summary.png``. Whatever was in ``folder`` before is replaced; every file
    and folder is fsynced, so a caller may record the results as durable once this returns.
    """
    objects = {("seg.dcm" if i == 0 else "seg-score.dcm"): ds for i, ds in enumerate(analysis.segmentations)}
    if analysis.measurement_report is not None:
        objects["sr.dcm"] = analysis.measurement_report
    for index, capture in enumerate(analysis.secondary_captures):
        objects[f"overlays/{'000-summary' if index == 0 else f'{index:03d}-slice'}.dcm"] = capture
    return _write_durably(folder, objects, "summary.png", analysis.summary_png)


def write_notice(notice: tuple[Dataset, bytes], folder: Path) -> list[Path]:
    """Write a NOT SCREENED notice (``notice.dcm``, ``notice.png``) as ``write_results`` writes results."""
    return _write_durably(folder, {"notice.dcm": notice[0]}, "notice.png", notice[1])


def _write_durably(folder: Path, objects: dict[str, Dataset], png_name: str, png: bytes) -> list[Path]:
    """``objects`` (relative path -> data set) and one PNG as a fresh ``folder``, every file and folder fsynced.

    Everything is written into a temporary sibling (``.job-N.partial-<pid>``) and renamed into place only when
    complete, so a process killed mid-write leaves either the old folder or the new one, never half of one (an
    older folder, from an earlier attempt, is replaced). Leftover temporary siblings are removed on the next write.
    """
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{folder.name}.partial-*", f".{folder.name}.old-*"):  # left by a writer killed mid-way
        for stale in parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    staging = parent / f".{folder.name}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        written = []
        for name, dataset in objects.items():
            path = staging / name
            path.parent.mkdir(exist_ok=True)
            dataset.save_as(path, enforce_file_format=True)
            written.append(name)
        (staging / png_name).write_bytes(png)
        folders = sorted({(staging / name).parent for name in written} - {staging})
        for path in [*(staging / name for name in written), staging / png_name, *folders, staging]:
            _fsync(path)
        old = None
        if folder.exists():  # rename cannot replace a non-empty folder: move the old one aside first
            old = parent / f".{folder.name}.old-{os.getpid()}"
            os.rename(folder, old)
        os.rename(staging, folder)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return [folder / name for name in written]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _headers(instances: Sequence[Instance]) -> list[Dataset]:
    import pydicom

    return [i if isinstance(i, Dataset) else pydicom.dcmread(i, stop_before_pixels=True) for i in instances]
