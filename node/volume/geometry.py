"""Whether the frames of a series tile one regular 3D grid, and that grid in SimpleITK's terms.

The slice normal is row cosine x column cosine, so the direction matrix (columns: row cosine,
column cosine, normal) is a proper rotation and slice index k grows along the normal whatever
order the files came in. The slice spacing comes from the positions, never from SliceThickness
(slices may overlap or leave gaps between them).

Tolerances, and why:

- Orientation: direction cosines within 1e-3 of the first frame's (~0.06 degrees). Scanners write
  one stack's cosines identically or to ~1e-6; anything more is a different stack.
- Pixel spacing: within 0.1 % of the first frame's.
- In-plane shift: each frame's first pixel within 0.05 pixel of the line through the first frame's
  along the normal. More is a sheared stack (gantry tilt), which no direction matrix describes.
- Duplicate position: two frames closer than 0.01 mm along the normal (several echoes, phases or
  repeats in one series: which one belongs in the volume is not for this module to guess).
- Missing slice: a step over 1.5x the median step (one missing slice doubles a step).
- Uneven spacing: every slice within 5 % of the slice spacing of its place on the regular grid
  through the first and last slices, so no voxel is misplaced by more than 5 % of a slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from node.volume.frames import Frame
from node.volume.rejection import VolumeRejected

ORIENTATION_TOLERANCE = 1e-3
PIXEL_SPACING_TOLERANCE = 1e-3
IN_PLANE_TOLERANCE_PIXELS = 0.05
DUPLICATE_TOLERANCE_MM = 0.01
GAP_RATIO = 1.5
SPACING_TOLERANCE = 0.05


@dataclass(frozen=True)
class Grid:
    """Where the voxels lie, in SimpleITK's terms, and which frame fills each slice k."""

    order: tuple[int, ...]  # order[k]: index into the frames given to regular_grid
    size: tuple[int, int, int]  # columns (x), rows (y), slices (z)
    origin: tuple[float, float, float]  # centre of the first pixel of slice 0, mm, LPS
    spacing: tuple[float, float, float]  # between columns, between rows, between slices, mm
    direction: tuple[float, ...]  # 3x3 row-major; columns: row cosine, column cosine, slice normal


def regular_grid(frames: Sequence[Frame], min_slices: int = 3) -> Grid:
    """The grid the frames fill, sorted along the slice normal; raises VolumeRejected when they do not fill one."""
    if len(frames) < min_slices:
        raise VolumeRejected(f"too few slices: {len(frames)}, at least {min_slices} needed")
    first = frames[0]
    _check_same_pixel_grid(frames)
    row, column, normal = _axes(first)

    positions = np.array([f.position for f in frames])
    along = positions @ normal
    shift = (positions - positions[0]) - np.outer(along - along[0], normal)
    shift_pixels = np.abs(np.stack([shift @ row / first.pixel_spacing[1], shift @ column / first.pixel_spacing[0]]))
    worst = int(np.argmax(shift_pixels.max(axis=0)))
    if shift_pixels[:, worst].max() > IN_PLANE_TOLERANCE_PIXELS:
        raise VolumeRejected(
            f"slices are shifted within their plane: {frames[worst].source.label} lies "
            f"{np.linalg.norm(shift[worst]):.2f} mm off the line through {first.source.label} along the slice "
            "normal (a sheared stack, e.g. gantry tilt, is not a regular grid)"
        )

    order = np.argsort(along, kind="stable")
    sorted_along = along[order]
    steps = np.diff(sorted_along)
    label = [frames[i].source.label for i in order]
    if (duplicates := np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)).size:
        k = int(duplicates[0])
        raise VolumeRejected(
            f"duplicate position: {label[k]} and {label[k + 1]} both lie at {sorted_along[k]:.2f} mm along the "
            f"slice normal ({duplicates.size} duplicate(s); several echoes, phases or repeats in one series?)"
        )
    median = float(np.median(steps))
    if (gaps := np.flatnonzero(steps > GAP_RATIO * median)).size:
        k = int(gaps[0])
        raise VolumeRejected(
            f"missing slice: a gap of {steps[k]:.2f} mm between {label[k]} and {label[k + 1]} where slices are "
            f"{median:.2f} mm apart (about {round(steps[k] / median) - 1} slice(s) missing; {gaps.size} gap(s) in all)"
        )
    spacing = float(sorted_along[-1] - sorted_along[0]) / (len(frames) - 1)
    off_grid = np.abs(sorted_along - sorted_along[0] - spacing * np.arange(len(frames)))
    k = int(np.argmax(off_grid))
    if off_grid[k] > SPACING_TOLERANCE * spacing:
        raise VolumeRejected(
            f"uneven slice spacing: {label[k]} lies {off_grid[k]:.2f} mm from its place on a regular grid of "
            f"{spacing:.2f} mm steps (tolerance {SPACING_TOLERANCE:.0%} of a step)"
        )
    return Grid(
        order=tuple(int(i) for i in order),
        size=(first.columns, first.rows, len(frames)),
        origin=tuple(float(x) for x in positions[order[0]]),  # type: ignore[arg-type]
        spacing=(first.pixel_spacing[1], first.pixel_spacing[0], spacing),
        direction=tuple(float(x) for x in np.column_stack([row, column, normal]).ravel()),
    )


def _check_same_pixel_grid(frames: Sequence[Frame]) -> None:
    """Every frame has the first one's matrix size, pixel spacing and orientation."""
    first = frames[0]
    sizes = sorted({(f.rows, f.columns) for f in frames})
    if len(sizes) > 1:
        shown = ", ".join(f"{rows}x{columns}" for rows, columns in sizes)
        raise VolumeRejected(f"mixed image sizes (rows x columns): {shown}")
    reference = np.array(first.pixel_spacing)
    for f in frames:
        if np.any(np.abs(np.array(f.pixel_spacing) - reference) > PIXEL_SPACING_TOLERANCE * reference):
            raise VolumeRejected(
                f"mixed pixel spacing: {f.source.label} has {_mm(f.pixel_spacing)}, "
                f"{first.source.label} has {_mm(first.pixel_spacing)}"
            )
    tilted = [
        f for f in frames if np.max(np.abs(np.subtract(f.orientation, first.orientation))) > ORIENTATION_TOLERANCE
    ]
    if tilted:
        raise VolumeRejected(
            f"mixed orientations: {len(tilted)} of {len(frames)} frames are not parallel to {first.source.label} "
            f"(e.g. {tilted[0].source.label}); a volume is one stack of parallel slices"
        )


def _axes(frame: Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row cosine, column cosine and slice normal as an exact right-handed orthonormal basis."""
    row, column = np.array(frame.orientation[:3]), np.array(frame.orientation[3:])
    lengths = np.linalg.norm(row), np.linalg.norm(column)
    if max(abs(lengths[0] - 1), abs(lengths[1] - 1), abs(row @ column)) > ORIENTATION_TOLERANCE:
        raise VolumeRejected(
            f"{frame.source.label} has an ImageOrientationPatient that is not two perpendicular unit vectors"
        )
    row = row / lengths[0]
    column = column - (column @ row) * row
    column = column / np.linalg.norm(column)
    return row, column, np.cross(row, column)


def _mm(spacing: Sequence[float]) -> str:
    return "x".join(f"{s:g}" for s in spacing) + " mm"
