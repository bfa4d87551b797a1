"""What the analysis of one series found, on the series' own voxel grid, with the figures every result shows.

One object carries the mask, the score map and the model's identity to all writers (SEG, overlays,
summary, report), so the figures a radiologist reads in the summary image are the ones in
report.json: they are computed once, here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True, eq=False)
class Findings:
    """The analysis of one series on the series' own grid, and its summary figures.

    Build it with :func:`findings_from`, which checks the arrays and computes the figures.
    """

    mask: np.ndarray  # bool (k, rows, cols), aligned with SeriesVolume.image
    score: np.ndarray  # float32 (k, rows, cols) anomaly score, 0 outside the brain
    threshold: float
    model_name: str  # e.g. "cDDPM default T1"
    model_version: str  # short checkpoint hash, e.g. "3f2a9c01be77"
    spacing_mm: tuple[float, float, float]  # between columns, rows, slices (SimpleITK order)
    components: int  # 3D connected components of the mask (26-connectivity)
    max_score: float  # highest score anywhere (0.0 for an all-zero map)
    calibration: str | None = None  # where the threshold comes from ("shipped", "site: FP <= 2 mL on ...")

    @property
    def voxel_volume_ml(self) -> float:
        return math.prod(self.spacing_mm) / 1000.0

    @property
    def anomaly_volume_ml(self) -> float:
        """Volume of the mask: voxel count times voxel volume (mm^3 -> mL)."""
        return float(np.count_nonzero(self.mask)) * self.voxel_volume_ml

    @property
    def found(self) -> bool:
        """Whether any voxel is above threshold (decides which images are worth showing)."""
        return bool(self.mask.any())

    def slice_areas(self) -> np.ndarray:
        """Mask voxels per slice k: which slices show most of the findings."""
        return np.count_nonzero(self.mask, axis=(1, 2))


def findings_from(
    mask: np.ndarray,
    score: np.ndarray,
    threshold: float,
    model_name: str,
    model_version: str,
    spacing_mm: Sequence[float],
    *,
    calibration: str | None = None,
) -> Findings:
    """Checked findings with their figures; raises ValueError when the arrays cannot describe one series.

    ``spacing_mm`` is the series image's spacing (``SeriesVolume.image.GetSpacing()``: columns, rows,
    slices), which turns voxel counts into millilitres. ``calibration``: the checkpoint's
    ``calibration_label``, shown with the threshold.
    """
    mask = np.asarray(mask)
    score = np.asarray(score, dtype=np.float32)
    if mask.ndim != 3 or mask.shape != score.shape:
        raise ValueError(f"mask {mask.shape} and score {score.shape} must be the same (k, rows, cols) grid")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("the mask holds values other than 0 and 1")
        mask = mask.astype(bool)
    if not np.isfinite(score).all():
        raise ValueError("the score map holds NaN or infinite values")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold {threshold} is not a finite number")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing {spacing_mm} must be three positive numbers (mm)")
    if not model_name.strip() or not model_version.strip():
        raise ValueError("model name and version must not be empty: every result names the model that made it")
    mask, score = mask.view(), score.view()  # read-only views: writers share them, the caller's arrays stay as they are
    mask.setflags(write=False)
    score.setflags(write=False)
    return Findings(
        mask=mask,
        score=score,
        threshold=float(threshold),
        model_name=model_name.strip(),
        model_version=model_version.strip(),
        spacing_mm=spacing,  # type: ignore[arg-type]
        components=count_components(mask),
        max_score=float(score.max()) if score.size else 0.0,
        calibration=calibration,
    )


def count_components(mask: np.ndarray) -> int:
    """3D connected components with 26-connectivity (faces, edges and corners touch), as the post-processing
    that removes small components counts them."""
    if not mask.any():
        return 0
    labels = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    return int(sitk.GetArrayViewFromImage(labels).max())


@dataclass(frozen=True)
class Region:
    """One connected finding: how big, and where (patient coordinates, so a reader can find it in any viewer)."""

    volume_ml: float
    centre_lps: tuple[float, float, float]  # centroid, mm, DICOM patient coordinates (x to the left, y back, z up)


def largest_region(findings: Findings, grid: sitk.Image) -> Region | None:
    """The biggest 26-connected component of the mask, placed with ``grid`` (the series image: origin,
    spacing, direction); None when nothing was found."""
    if not findings.found:
        return None
    mask = sitk.GetImageFromArray(findings.mask.astype(np.uint8))
    mask.CopyInformation(grid)
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask, True), sortByObjectSize=True)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(labels)
    centre = tuple(round(float(c), 1) for c in shape.GetCentroid(1))
    return Region(volume_ml=shape.GetNumberOfPixels(1) * findings.voxel_volume_ml, centre_lps=centre)  # type: ignore[arg-type]
