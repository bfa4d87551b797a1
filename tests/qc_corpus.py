"""The QC corpus: real offline brains written as DICOM MR series, some the quality gate must pass, some it must fail.

The gate between preprocessing and the model (registration similarity to the atlas, brain-mask
plausibility, brain coverage of the field of view, tissue contrast order against the contrast class) is
tested and calibrated on these cases. Positives are real heads in the geometries, resolutions and
artefacts a PACS sends (axial, oblique, sagittal 3D, thick slices, 512 matrix, bias field, low SNR, and
T2-/FLAIR-like contrast labelled as such); negatives are things that reach the node with a valid MR
header but are not a usable brain of the labelled contrast (a phantom, noise, a head whose voxels are
flipped against their tags, a slab that misses most of the brain, a T2-like head labelled T1).

Every case is deterministic (fixed seeds); each write makes fresh Study/Series/SOP UIDs and uses the
fake patient of ``node.demo.series_writer``. The SeriesDescription (and the timing) of each series make
``node.selection`` classify it as the case's ``contrast``. Colin27 is the evaluation brain: these cases
are for testing and calibrating the gate's thresholds, never for training.

The T2-/FLAIR-like heads are Colin27 remapped inside its brain mask: three intensity classes (CSF, GM,
WM; 1-D k-means) are mapped to the target contrast's class intensities, piecewise linearly between the
class means (two-class partial-volume blending), and blended into the untouched T1 head across a
smoothed mask edge. Outside the mask the T1 intensities stay (scalp fat is bright on T2 and FLAIR
too); the CSF outside the brain mask stays T1-dark, so these heads lack the bright rim of a real T2.

Not in the corpus: a head mirrored left-right against its tags. Brains are near-symmetric, so no image
measure (atlas similarity, mask, coverage, contrast) can tell a left-right mirror from the real head;
it is a known limitation of any image-based gate, and only the acquisition chain can guard it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from node.demo.series_writer import AXIAL, SAGITTAL, SliceGrid, centred_grid, resample, write_mr_series
from tests import brains
from tests.dicom_series import rotated

__all__ = ["Measured", "QcCase", "case_volume", "measure_corpus", "qc_cases", "write_case"]

Expected = Literal["pass", "fail"]
ContrastLabel = Literal["T1", "T2", "FLAIR"]


@dataclass(frozen=True)
class QcCase:
    """One series of the corpus and what the quality gate must say about it."""

    name: str  # short id, e.g. "colin27-oblique15"; also the folder the series is written to
    expected: Expected
    contrast: ContrastLabel  # the contrast class the series is labelled as (and sent to)
    why: str  # what it is; for a negative, which check must catch it
    caught_by: str = ""  # for a negative, the measure that must refuse it (registration, coverage, contrast)


@dataclass(frozen=True)
class _Acquisition:
    """How a series is labelled: its SeriesDescription and scanner timing (both classify its contrast)."""

    description: str
    attributes: dict[str, Any]


_COMMON: dict[str, Any] = {
    "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
    "BodyPartExamined": "HEAD",
    "Manufacturer": "uad-node QC corpus",
    "MagneticFieldStrength": 3.0,
}
_MPRAGE: dict[str, Any] = {
    **_COMMON,
    "ScanningSequence": ["GR", "IR"],
    "SequenceVariant": ["SK", "SP", "MP"],
    "MRAcquisitionType": "3D",
    "RepetitionTime": 2300.0,
    "EchoTime": 2.98,
    "InversionTime": 900.0,
    "FlipAngle": 9.0,
}
_T1_SE: dict[str, Any] = {
    **_COMMON,
    "ScanningSequence": "SE",
    "SequenceVariant": "SP",
    "MRAcquisitionType": "2D",
    "RepetitionTime": 500.0,
    "EchoTime": 10.0,
    "FlipAngle": 90.0,
}
_T2_TSE: dict[str, Any] = {
    **_COMMON,
    "ScanningSequence": "SE",
    "SequenceVariant": ["SK", "SP"],
    "MRAcquisitionType": "2D",
    "RepetitionTime": 5000.0,
    "EchoTime": 100.0,
    "EchoTrainLength": 15,
    "FlipAngle": 150.0,
}
_FLAIR: dict[str, Any] = {
    **_COMMON,
    "ScanningSequence": ["SE", "IR"],
    "SequenceVariant": ["SK", "SP", "MP"],
    "MRAcquisitionType": "2D",
    "RepetitionTime": 9000.0,
    "EchoTime": 90.0,
    "InversionTime": 2500.0,
    "FlipAngle": 150.0,
}


def _mprage(suffix: str = "AX") -> _Acquisition:
    return _Acquisition(f"T1 MPRAGE {suffix}", _MPRAGE)


# Geometry of the Colin27 cases (mm; columns, rows, slices).
CLINICAL_3D_SPACING = (0.9375, 0.9375, 1.2)  # 240 mm field of view, 180 mm of slices: the whole head
CLINICAL_3D_SIZE = (256, 256, 150)
THICK_SPACING, THICK_SIZE = (0.9, 0.9, 5.0), (256, 256, 36)
MATRIX_512_SPACING, MATRIX_512_SIZE = (0.45, 0.45, 4.0), (512, 512, 45)
SAGITTAL_SPACING, SAGITTAL_SIZE = (1.0, 1.0, 1.0), (256, 256, 160)
T2_SPACING, T2_SIZE = (0.9375, 0.9375, 3.0), (256, 256, 60)
OBLIQUE_DEGREES = 15.0
OBLIQUE_SIZE = (256, 256, 160)  # a few more slices: the tilted slab must still hold the whole brain
SLAB_SPACING, SLAB_SIZE = (0.9375, 0.9375, 1.2), (256, 256, 24)  # 28.8 mm
SLAB_ABOVE_VERTEX_MM = 2.0  # the slab's top slice lies this far above the skin at the vertex

BIAS_RANGE = (0.6, 1.6)  # multiplicative bias field, lowest to highest over the head
LOW_SNR_NOISE = 0.09  # Rician noise std as a fraction of the white-matter intensity

# Tissue class intensities (CSF, GM, WM) relative to the brightest tissue, mid-range of models.data.synthesis.
_TISSUE_TARGETS = {"T2": (0.92, 0.55, 0.33), "FLAIR": (0.12, 0.90, 0.61)}
_REMAP_BRIGHTEST = 1.6  # the brightest remapped tissue, in units of Colin27's T1 white matter (~scalp fat)

_SEEDS = {"colin27-lowsnr": 12001, "phantom": 12002, "noise": 12003}


# --- sources ---------------------------------------------------------------------------------------------------


@functools.cache
def _colin27_head() -> sitk.Image:
    return brains.colin27(skull=True)


@functools.cache
def _colin27_classes() -> tuple[float, float, float]:
    """Mean T1 intensity of CSF, GM and WM inside Colin27's brain mask (1-D k-means, fixed start)."""
    mask = brains.colin27_brain_mask()  # held: an array view does not keep its image alive
    values = sitk.GetArrayFromImage(_colin27_head())[sitk.GetArrayViewFromImage(mask) > 0]
    centres = np.percentile(values, [10, 50, 90]).astype(np.float64)
    for _ in range(50):
        labels = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        updated = np.array([values[labels == c].mean() for c in range(3)])
        if np.allclose(updated, centres, atol=1e-3):
            break
        centres = updated
    csf, gm, wm = (float(c) for c in centres)
    return csf, gm, wm


@functools.cache
def _colin27_as(contrast: ContrastLabel) -> sitk.Image:
    """Colin27 with skull, its brain remapped to T2-like or FLAIR-like tissue contrast (see module docstring)."""
    head = _colin27_head()
    if contrast == "T1":
        return head
    classes = _colin27_classes()
    brightest = _REMAP_BRIGHTEST * classes[2]
    targets = [brightest * t for t in _TISSUE_TARGETS[contrast]]
    t1 = sitk.GetArrayViewFromImage(head)
    remapped = np.interp(t1, classes, targets).astype(np.float32)  # constant beyond the CSF and WM means
    mask = sitk.SmoothingRecursiveGaussian(sitk.Cast(brains.colin27_brain_mask(), sitk.sitkFloat32), 1.0)
    weight = np.clip(sitk.GetArrayViewFromImage(mask), 0.0, 1.0)
    image = sitk.GetImageFromArray(weight * remapped + (1.0 - weight) * t1)
    image.CopyInformation(head)
    return image


def _thick_slices(image: sitk.Image, thickness_mm: float) -> sitk.Image:
    """``image`` (1 mm, axis 2 along the slice normal) blurred along z by a ``thickness_mm`` slice profile,
    so that sampling it every ``thickness_mm`` gives thick slices, not thin slices far apart."""
    variance = (thickness_mm**2 - image.GetSpacing()[2] ** 2) / 12.0  # boxcar profile, less the voxel's own
    if variance <= 0:
        return image
    return sitk.RecursiveGaussian(image, math.sqrt(variance), direction=2)


def _colin27_on(grid: SliceGrid, contrast: ContrastLabel = "T1") -> sitk.Image:
    """Colin27 (skull on) sampled on ``grid``; an axial grid thicker than 1.5 mm gets a slice profile."""
    source = _colin27_as(contrast)
    if grid.direction == AXIAL and grid.spacing[2] > 1.5:
        source = _thick_slices(source, grid.spacing[2])
    return sitk.Clamp(resample(source, grid), lowerBound=0.0)  # the slice profile's filter rings slightly below 0


def _colin27_grid(
    direction: tuple[float, ...], spacing: tuple[float, float, float], size: tuple[int, int, int]
) -> SliceGrid:
    return centred_grid(_colin27_head(), direction, spacing, size)


def _clinical_grid() -> SliceGrid:
    return _colin27_grid(AXIAL, CLINICAL_3D_SPACING, CLINICAL_3D_SIZE)


def _grid_at(
    centre: tuple[float, float, float],
    direction: tuple[float, ...],
    spacing: tuple[float, float, float],
    size: tuple[int, int, int],
) -> SliceGrid:
    """A grid of ``size`` voxels centred on a patient point (for the cases that have no head to centre on)."""
    half_extent = np.reshape(direction, (3, 3)) @ (np.multiply(spacing, np.subtract(size, 1)) / 2)
    return SliceGrid(direction, spacing, size, tuple(float(x) for x in np.subtract(centre, half_extent)))  # type: ignore[arg-type]


def _coordinates(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient x, y, z (mm, float32) of every voxel, each broadcastable to the image's numpy array (z, y, x)."""
    direction = np.reshape(image.GetDirection(), (3, 3))
    axes = [np.arange(n, dtype=np.float32) * s for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
    shapes = [(1, 1, -1), (1, -1, 1), (-1, 1, 1)]  # index i, j, k in numpy's (k, j, i) layout
    coordinates = []
    for row in range(3):
        value = np.full((1, 1, 1), image.GetOrigin()[row], np.float32)
        for axis in range(3):
            if direction[row, axis] != 0:  # an axis-aligned grid keeps each coordinate a cheap 1-D broadcast
                value = value + np.float32(direction[row, axis]) * axes[axis].reshape(shapes[axis])
        coordinates.append(value)
    return coordinates[0], coordinates[1], coordinates[2]


def _with_voxels(voxels: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels, dtype=np.float32))
    image.CopyInformation(like)
    return image


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise: what a magnitude MR image's noise is."""
    real = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary)


# --- the cases -------------------------------------------------------------------------------------------------


def _mni152() -> sitk.Image:
    template = brains.mni152_t1()
    return resample(template, centred_grid(template, AXIAL, (1.0, 1.0, 1.0), template.GetSize()))  # type: ignore[arg-type]


def _itk_head() -> sitk.Image:
    return brains.itk_head()


def _colin27() -> sitk.Image:
    return _colin27_on(_clinical_grid())


def _colin27_oblique() -> sitk.Image:
    return _colin27_on(_colin27_grid(rotated(AXIAL, 0, OBLIQUE_DEGREES), CLINICAL_3D_SPACING, OBLIQUE_SIZE))


def _colin27_sagittal() -> sitk.Image:
    return _colin27_on(_colin27_grid(SAGITTAL, SAGITTAL_SPACING, SAGITTAL_SIZE))


def _colin27_thick() -> sitk.Image:
    return _colin27_on(_colin27_grid(AXIAL, THICK_SPACING, THICK_SIZE))


def _colin27_512() -> sitk.Image:
    return _colin27_on(_colin27_grid(AXIAL, MATRIX_512_SPACING, MATRIX_512_SIZE))


def _colin27_bias() -> sitk.Image:
    """A smooth field, log-linear across the head from left-anterior-superior plus a central bump (as coils
    and dielectric effects give), scaled to run from BIAS_RANGE[0] to BIAS_RANGE[1] over the head."""
    head = _colin27()
    x, y, z = _coordinates(head)
    centre = head.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in head.GetSize()])
    dx, dy, dz = x - np.float32(centre[0]), y - np.float32(centre[1]), z - np.float32(centre[2])
    radius = np.float32(90.0)
    gradient = (dx - dy + dz) / (np.float32(math.sqrt(3.0)) * radius)  # towards left, anterior, superior
    shape = gradient + 0.5 * (1 - (dx * dx + dy * dy + dz * dz) / radius**2)
    voxels = sitk.GetArrayViewFromImage(head)
    inside = shape[voxels > 0.2 * voxels.max()]
    t = np.clip((shape - inside.min()) / (inside.max() - inside.min()), 0.0, 1.0)
    low, high = BIAS_RANGE
    return _with_voxels(voxels * (low * (high / low) ** t), head)


def _colin27_low_snr() -> sitk.Image:
    head = _colin27()
    sigma = LOW_SNR_NOISE * _colin27_classes()[2]
    rng = np.random.default_rng(_SEEDS["colin27-lowsnr"])
    return _with_voxels(_rician(sitk.GetArrayViewFromImage(head), sigma, rng), head)


def _colin27_t2like() -> sitk.Image:
    return _colin27_on(_colin27_grid(AXIAL, T2_SPACING, T2_SIZE), "T2")


def _colin27_flairlike() -> sitk.Image:
    return _colin27_on(_colin27_grid(AXIAL, T2_SPACING, T2_SIZE), "FLAIR")


def _phantom() -> sitk.Image:
    """A water-bottle phantom: a cylinder 180 mm across and 140 mm long along the bore, uniform but for a
    gentle shading, with a blurred edge and a little Rician noise."""
    image = _grid_at((0.0, 0.0, 0.0), AXIAL, (0.9375, 0.9375, 3.0), (256, 256, 50)).reference()
    x, y, z = _coordinates(image)
    inside = ((x * x + y * y) <= 90.0**2) & (np.abs(z) <= 70.0)
    blurred = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(_with_voxels(inside, image), 1.0))
    shading = 1.0 + 0.06 * x / 90.0 - 0.04 * y / 90.0 + 0.05 * (x * x + y * y) / 90.0**2
    rng = np.random.default_rng(_SEEDS["phantom"])
    return _with_voxels(_rician(800.0 * blurred * shading, 12.0, rng), image)


def _noise() -> sitk.Image:
    """What a magnitude image of nothing is: Rayleigh noise (Rician with no signal)."""
    image = _grid_at((0.0, -20.0, 20.0), AXIAL, (0.9375, 0.9375, 4.0), (256, 256, 40)).reference()
    rng = np.random.default_rng(_SEEDS["noise"])
    return _with_voxels(_rician(np.zeros(image.GetSize()[::-1], np.float32), 30.0, rng), image)


def _mirrored_si() -> sitk.Image:
    """The clinical Colin27 series with its slices in reverse order against unchanged positions."""
    head = _colin27()
    return _with_voxels(sitk.GetArrayViewFromImage(head)[::-1], head)


def _rows_flipped() -> sitk.Image:
    """The clinical Colin27 series with every slice's pixel rows reversed (anterior <-> posterior)."""
    head = _colin27()
    return _with_voxels(sitk.GetArrayViewFromImage(head)[:, ::-1, :], head)


def _partial_slab() -> sitk.Image:
    """28.8 mm of axial slices ending just above the vertex: mostly scalp, skull and the top of the cortex."""
    head = _colin27_head()
    voxels = sitk.GetArrayViewFromImage(head)
    head_area = (voxels > 0.2 * voxels.max()).sum(axis=(1, 2))  # scalp and skin, not stray bright voxels
    top = int(np.nonzero(head_area > 50)[0].max())
    top_z = head.TransformIndexToPhysicalPoint((0, 0, top))[2] + SLAB_ABOVE_VERTEX_MM
    centre = head.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in head.GetSize()])
    centre_z = top_z - SLAB_SPACING[2] * (SLAB_SIZE[2] - 1) / 2
    return resample(head, _grid_at((centre[0], centre[1], centre_z), AXIAL, SLAB_SPACING, SLAB_SIZE))


def _mid_slab() -> sitk.Image:
    """28.8 mm of axial slices through the middle of the head (a limited-coverage series, e.g. a targeted slab)."""
    return resample(_colin27_head(), _colin27_grid(AXIAL, SLAB_SPACING, SLAB_SIZE))


_T2 = _Acquisition("T2 TSE AX", _T2_TSE)
_CASES: tuple[tuple[QcCase, Callable[[], sitk.Image], _Acquisition], ...] = (
    (QcCase("mni152", "pass", "T1", "MNI152 2009 T1 template, skull-stripped, axial 1 mm"), _mni152, _mprage()),
    (
        QcCase("itk-head", "pass", "T1", "ITK example T1 head (another subject, skull on), native 2x2x3 mm coronal"),
        _itk_head,
        _Acquisition("T1 SE COR", _T1_SE),
    ),
    (QcCase("colin27", "pass", "T1", "Colin27 with skull, axial 0.94x0.94x1.2 mm, 256 matrix"), _colin27, _mprage()),
    (
        QcCase("colin27-oblique15", "pass", "T1", "Colin27 axial tilted 15 degrees about left-right (AC-PC plan)"),
        _colin27_oblique,
        _mprage("AX OBL"),
    ),
    (
        QcCase("colin27-sagittal3d", "pass", "T1", "Colin27 3D T1 acquired sagittally, 1 mm isotropic"),
        _colin27_sagittal,
        _mprage("SAG"),
    ),
    (
        QcCase("colin27-axial5mm", "pass", "T1", "Colin27 thick-slice clinical T1: 5 mm axial, 0.9 mm in plane"),
        _colin27_thick,
        _Acquisition("T1 SE AX 5mm", _T1_SE),
    ),
    (
        QcCase("colin27-bias", "pass", "T1", "Colin27 axial under a smooth multiplicative bias field, 0.6x to 1.6x"),
        _colin27_bias,
        _mprage(),
    ),
    (
        QcCase("colin27-lowsnr", "pass", "T1", "Colin27 axial with Rician noise, std 9 % of white matter"),
        _colin27_low_snr,
        _mprage(),
    ),
    (
        QcCase("colin27-512", "pass", "T1", "Colin27 512x512 matrix (0.45 mm in plane), 4 mm axial slices"),
        _colin27_512,
        _Acquisition("T1 SE AX 512", _T1_SE),
    ),
    (
        QcCase("colin27-t2like-as-t2", "pass", "T2", "Colin27 remapped to T2-like contrast (CSF>GM>WM), labelled T2"),
        _colin27_t2like,
        _T2,
    ),
    (
        QcCase(
            "colin27-flairlike-as-flair",
            "pass",
            "FLAIR",
            "Colin27 remapped to FLAIR-like contrast (CSF dark, GM>WM), labelled FLAIR",
        ),
        _colin27_flairlike,
        _Acquisition("FLAIR AX", _FLAIR),
    ),
    (
        QcCase(
            "phantom",
            "fail",
            "T1",
            "water-bottle phantom (cylinder 180 mm) with a T1 header: registration similarity must fail",
            caught_by="registration",
        ),
        _phantom,
        _mprage(),
    ),
    (
        QcCase(
            "noise",
            "fail",
            "T1",
            "pure Rician noise labelled T1: registration (scale) and similarity must fail",
            caught_by="registration",
        ),
        _noise,
        _mprage(),
    ),
    (
        QcCase(
            "mirrored-si",
            "fail",
            "T1",
            "Colin27 slices stacked head-to-foot against their positions: registration similarity must fail",
            caught_by="registration",
        ),
        _mirrored_si,
        _mprage(),
    ),
    (
        QcCase(
            "rows-flipped",
            "fail",
            "T1",
            "Colin27 with each slice's rows flipped (A<->P) against the tags: registration similarity must fail",
            caught_by="registration",
        ),
        _rows_flipped,
        _mprage(),
    ),
    (
        QcCase(
            "partial-slab",
            "fail",
            "T1",
            "Colin27 28.8 mm axial slab at the vertex, valid series: brain coverage of the field of view must fail",
            caught_by="registration",
        ),
        _partial_slab,
        _mprage(),
    ),
    (
        QcCase(
            "mid-slab",
            "fail",
            "T1",
            "Colin27 28.8 mm axial slab through the middle of the head: brain coverage must fail",
            caught_by="coverage",
        ),
        _mid_slab,
        _mprage(),
    ),
    (
        QcCase(
            "t2like-as-t1",
            "fail",
            "T1",
            "the T2-like Colin27 labelled T1: tissue contrast order (and atlas similarity) must fail",
            caught_by="contrast",
        ),
        _colin27_t2like,
        _mprage(),
    ),
)
_BY_NAME = {case.name: (case, build, acquisition) for case, build, acquisition in _CASES}


def qc_cases() -> list[QcCase]:
    """Every case of the corpus, positives first."""
    return [case for case, _, _ in _CASES]


@functools.lru_cache(maxsize=1)
def _volume(name: str) -> sitk.Image:
    """The last case built, kept so that ``write_case`` followed by ``case_volume`` builds it once."""
    return _BY_NAME[name][1]()


def case_volume(case: QcCase) -> sitk.Image:
    """The case's volume as written (float32; origin, spacing and direction are what the tags say)."""
    if _BY_NAME.get(case.name, (None,))[0] != case:
        raise ValueError(f"{case.name!r} is not a case of the QC corpus")
    return sitk.Image(_volume(case.name))  # a copy: the cached volume stays as built


def write_case(case: QcCase, folder: Path) -> Path:
    """Write the case as an MR series (one file per slice) under ``folder/<name>/``; returns that folder."""
    volume = case_volume(case)
    _, _, acquisition = _BY_NAME[case.name]
    target = folder / case.name
    write_mr_series(
        volume,
        target,
        description=acquisition.description,
        series_number=[c.name for c in qc_cases()].index(case.name) + 1,
        attributes={**acquisition.attributes, "ProtocolName": acquisition.description},
    )
    return target


@dataclass(frozen=True)
class Measured:
    """One case through the node's volume reader, the preprocessing and the quality gate."""

    case: QcCase
    quality: Any  # models.quality.gate.QualityReport; None when the preprocessing itself refused the series
    refused: str  # the preprocessing's reason when it refused (e.g. an implausible registration scale)
    gate_seconds: float  # the gate's own measures
    field_of_view_seconds: float  # the preprocessing's map of covered model voxels, which the gate needs

    def problems(self, thresholds: Any) -> list[str]:
        """Why the node would not screen this case (empty: it would)."""
        return [self.refused] if self.quality is None else self.quality.problems(thresholds)


def measure_corpus(folder: Path, cases: list[QcCase] | None = None) -> list[Measured]:
    """Write each case under ``folder`` and measure it as ``node.analysis`` does (atlas loaded once)."""
    import time

    from models.atlas import load_mni152_atlas
    from models.preprocessing import PreprocessingError, Preprocessor
    from models.quality.gate import QualityGate
    from node.volume import series_to_volume

    atlas = load_mni152_atlas()
    preprocessors = {contrast: Preprocessor(atlas, contrast=contrast) for contrast in ("t1", "t2", "flair")}
    gate = QualityGate(atlas, preprocessors["t1"].geometry)
    measured = []
    for case in cases or qc_cases():
        volume = series_to_volume(sorted(write_case(case, folder).iterdir()))
        try:
            prepared = preprocessors[case.contrast.lower()](volume.image)
        except PreprocessingError as exc:
            measured.append(Measured(case, None, f"preprocessing failed: {exc}", 0.0, 0.0))
            continue
        started = time.perf_counter()
        quality = gate.measure(prepared, case.contrast.lower())
        gate_seconds = time.perf_counter() - started
        measured.append(Measured(case, quality, "", gate_seconds, prepared.seconds["field_of_view"]))
    return measured
