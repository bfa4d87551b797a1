"""Simulated lesions on model-grid T1 volumes, for evaluation: no lesioned T1 volume exists offline.

Intensities are those of a preprocessed volume (normalised to [0, 1] by the 1st/99th percentile in the
brain). Tissue levels are measured on the volume itself (a 3-class k-means of the brain's
intensities), not assumed: on Colin27 they come out near CSF 0.3, GM 0.6, WM 0.92. Because WM sits
near the top of the range and the normalisation clips at the 99th percentile, a T1-hyperintense
("bright") lesion can only reach 1.0: its contrast against WM is small (~0.05-0.1) and large only
against GM and oedema. That is what a bright lesion looks like after this preprocessing.

Kinds (sizes are diameters; the model grid has 2 mm voxels, 0.008 mL):

- ``tumour``: an irregular (noise-perturbed) core 20-40 mm across with texture, inside a rim of oedema
  5-12 mm thick that shows as a GM-like darkening of WM. ``dark``: a T1-hypointense, CSF-like core
  (necrosis, cyst); ``bright``: a core above WM (enhancing tumour, subacute haemorrhage).
  Placed away from the brain's edge. Changed volume ~9-60 mL (BraTS-like sizes).
- ``wmh``: 3-8 ovoids 6-12 mm in white matter. ``dark``: GM-like (as WMH look on T1); ``bright``: above
  WM (as on FLAIR). Changed volume ~0.3-1.5 mL: small for a 2 mm grid and a 5x5x5 median, as real WMH are.
- ``stroke`` (dark only): a CSF-like wedge 20-40 mm across whose base lies on the cortex and whose
  apex points into the brain, as a territorial infarct. Changed volume ~4-25 mL.

Edges are soft (a logistic fall-off of ~1 voxel, like partial volume) and lesions carry a little
texture. The result is clipped to [0, 1] and 0 outside the brain, as a preprocessed volume. The mask
holds the voxels that really changed: lesion weight >= 0.5, inside the brain, and a noise-free
intensity change of at least ``MIN_VISIBLE_CHANGE``, so a lesion painted onto tissue of its own
intensity leaves no invisible ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

Polarity = Literal["dark", "bright"]
LESION_KINDS: tuple[tuple[str, Polarity], ...] = (
    ("tumour", "dark"),
    ("tumour", "bright"),
    ("wmh", "dark"),
    ("wmh", "bright"),
    ("stroke", "dark"),
)
VOXEL_MM = 2.0
MIN_VISIBLE_CHANGE = 0.05  # normalised intensity; ~1/6 of the GM-WM contrast
EDGE_VOXELS = 0.3  # logistic width of the soft edge, in voxels: ~1 voxel of partial volume
BRIGHT_LEVEL = 1.08  # above WM before clipping: enhancing tumour / FLAIR-like hyperintensity
TUMOUR_CORE_MM = (20.0, 40.0)
TUMOUR_OEDEMA_MM = (5.0, 12.0)
WMH_COUNT = (3, 8)
WMH_MM = (6.0, 12.0)
STROKE_MM = (20.0, 40.0)


@dataclass(frozen=True, eq=False)
class SimulatedLesion:
    """A volume with one simulated lesion (or a cluster, for WMH) and the voxels that it changed."""

    image: np.ndarray  # float32 in [0, 1], 0 outside the brain
    mask: np.ndarray  # bool: the voxels the lesion visibly changed
    kind: str
    polarity: Polarity


@dataclass(frozen=True)
class TissueLevels:
    """Mean normalised intensities of the three tissue classes in one volume."""

    csf: float
    gm: float
    wm: float


def tissue_levels(volume: np.ndarray, brain_mask: np.ndarray) -> TissueLevels:
    """CSF, GM and WM levels by a 1D 3-class k-means of the brain's intensities (robust to the subject)."""
    values = volume[brain_mask].astype(np.float64)
    centres = np.percentile(values, [10, 50, 90])
    for _ in range(30):
        labels = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        updated = np.array([values[labels == k].mean() if np.any(labels == k) else centres[k] for k in range(3)])
        if np.allclose(updated, centres, atol=1e-5):
            break
        centres = updated
    csf, gm, wm = np.sort(centres)
    return TissueLevels(csf=float(csf), gm=float(gm), wm=float(wm))


def white_matter(volume: np.ndarray, brain_mask: np.ndarray, levels: TissueLevels | None = None) -> np.ndarray:
    """Voxels that are white matter by intensity (lightly smoothed, above the GM/WM midpoint), eroded once."""
    levels = levels or tissue_levels(volume, brain_mask)
    smooth = ndimage.gaussian_filter(volume.astype(np.float32), 0.5)
    wm = brain_mask & (smooth > (levels.gm + levels.wm) / 2)
    return ndimage.binary_erosion(wm)


def simulate_lesion(
    volume: np.ndarray, brain_mask: np.ndarray, kind: str, polarity: str, rng: np.random.Generator
) -> SimulatedLesion:
    """``volume`` with one simulated lesion of ``kind`` / ``polarity`` (see LESION_KINDS); same rng, same lesion."""
    if (kind, polarity) not in LESION_KINDS:
        raise ValueError(f"no {polarity} {kind} lesion; the kinds are {LESION_KINDS}")
    brain = np.asarray(brain_mask, dtype=bool)
    if not brain.any():
        raise ValueError("the brain mask is empty")
    volume = np.asarray(volume, dtype=np.float32)
    levels = tissue_levels(volume, brain)
    painter = {"tumour": _tumour, "wmh": _wmh, "stroke": _stroke}[kind]
    layers = painter(volume, brain, levels, polarity, rng)
    clean = volume.copy()
    textured = volume.copy()
    for weight, _, level, texture in layers:
        # Texture only where the layer visibly changes the tissue: no invisible lesion, no speckle around it.
        visible = np.clip(np.abs(level - clean) / (2 * MIN_VISIBLE_CHANGE), 0, 1)
        clean = (1 - weight) * clean + weight * level
        textured = (1 - weight) * textured + weight * (level + visible * texture)
    extent = np.maximum.reduce([layer[1] for layer in layers])
    changed = np.abs(np.clip(clean, 0, 1) - volume) >= MIN_VISIBLE_CHANGE
    mask = brain & (extent >= 0.5) & changed
    image = np.where(brain, np.clip(textured, 0, 1), 0).astype(np.float32)
    return SimulatedLesion(image=image, mask=mask, kind=kind, polarity=polarity)  # type: ignore[arg-type]


# A layer: (weight in [0, 1], the lesion's geometric extent in [0, 1] (the weight before any tissue
# modulation: what the ground truth covers), target level, texture added to the level).
_Layer = tuple[np.ndarray, np.ndarray, float | np.ndarray, np.ndarray]


def _tumour(
    volume: np.ndarray, brain: np.ndarray, levels: TissueLevels, polarity: str, rng: np.random.Generator
) -> list[_Layer]:
    core_radius = rng.uniform(*TUMOUR_CORE_MM) / 2 / VOXEL_MM
    oedema = rng.uniform(*TUMOUR_OEDEMA_MM) / VOXEL_MM
    if polarity == "bright":  # a thinner rim around an enhancing core: the lesion as a whole stays bright
        oedema *= 0.6
    depth = np.asarray(ndimage.distance_transform_edt(brain))
    centre = _pick(depth >= core_radius + 0.5 * oedema + 1, depth, rng)
    axes = core_radius * rng.uniform(0.75, 1.25, size=3)
    rotation = _random_rotation(rng)
    core = _blob(brain.shape, centre, axes, rotation, _noise(brain.shape, 2.0, rng), 0.25)
    outer = _blob(brain.shape, centre, axes + oedema, rotation, _noise(brain.shape, 2.5, rng), 0.3)
    # Oedema spreads along white matter: full strength there, fainter in grey matter.
    wm_weight = np.clip((volume - levels.gm) / (levels.wm - levels.gm), 0, 1)
    oedema_weight = outer * (0.4 + 0.6 * wm_weight) * brain
    # Intermediate between GM and WM, and only ever darkening (oedema lengthens T1). Around a bright
    # core it is kept subtler (as oedema is on post-contrast T1), so the lesion as a whole is bright.
    depth_of_change = 0.5 if polarity == "dark" else 0.3
    oedema_level = np.minimum(volume, levels.wm - depth_of_change * (levels.wm - levels.gm))
    if polarity == "dark":
        core_level = levels.csf + rng.uniform(-0.05, 0.1)
    else:
        core_level = BRIGHT_LEVEL
    texture = 0.05 * _noise(brain.shape, 1.0, rng)
    return [(oedema_weight, outer, oedema_level, 0.5 * texture), (core * brain, core, core_level, texture)]


def _wmh(
    volume: np.ndarray, brain: np.ndarray, levels: TissueLevels, polarity: str, rng: np.random.Generator
) -> list[_Layer]:
    wm = white_matter(volume, brain, levels)
    if not wm.any():
        raise ValueError("no white matter found in the volume")
    wm_depth = np.asarray(ndimage.distance_transform_edt(wm))
    soft_wm = np.clip(ndimage.gaussian_filter(wm.astype(np.float32), 0.7) * 1.5, 0, 1)
    weight = np.zeros(brain.shape, dtype=np.float32)
    noise = _noise(brain.shape, 1.0, rng)
    for _ in range(int(rng.integers(WMH_COUNT[0], WMH_COUNT[1] + 1))):
        diameter = rng.uniform(*WMH_MM) / VOXEL_MM
        axes = diameter / 2 * np.array([1.0, rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9)])
        centre = _pick(wm_depth >= axes[1] + 0.5, wm_depth, rng)
        weight = np.maximum(weight, _blob(brain.shape, centre, axes, _random_rotation(rng), noise, 0.15))
    extent = weight.copy()
    weight *= soft_wm  # stays in white matter
    level = levels.gm if polarity == "dark" else BRIGHT_LEVEL
    return [(weight, extent, level, 0.03 * _noise(brain.shape, 1.0, rng))]


def _stroke(
    volume: np.ndarray, brain: np.ndarray, levels: TissueLevels, polarity: str, rng: np.random.Generator
) -> list[_Layer]:
    size = rng.uniform(*STROKE_MM) / VOXEL_MM  # base width and depth, in voxels
    depth = np.asarray(ndimage.distance_transform_edt(brain))
    inner = np.argwhere(depth >= size)
    centroid = (inner if len(inner) else np.argwhere(brain)).mean(axis=0)
    # A cortical surface point whose inward direction has room for the wedge (lateral convexity).
    surface = (depth > 0) & (depth <= 1.5)
    base = _pick(surface & _far_from(centroid, brain.shape, 0.6 * size), depth, rng, prefer_deep=False)
    inward = centroid - base
    inward /= np.linalg.norm(inward)
    coords = np.indices(brain.shape, dtype=np.float32)
    offset = coords - base.reshape(3, 1, 1, 1)
    along = np.tensordot(inward, offset, axes=1)  # depth into the brain from the base point
    radial = np.sqrt(np.maximum((offset**2).sum(axis=0) - along**2, 0))
    reach = size * rng.uniform(0.8, 1.2)
    half_width = size / 2 * np.clip(1 - along / reach, 0, 1) + 0.5  # widest at the cortex, apex inside
    distance = np.maximum(radial / half_width, np.abs(along - reach / 2) / (reach / 2 + 1.0))
    distance = distance + 0.2 * np.clip(_noise(brain.shape, 2.0, rng), -2, 2)
    weight = _logistic(distance, reach / 2) * brain
    return [(weight, weight, levels.csf + rng.uniform(-0.05, 0.05), 0.04 * _noise(brain.shape, 1.0, rng))]


def _pick(candidates: np.ndarray, depth: np.ndarray, rng: np.random.Generator, prefer_deep: bool = True) -> np.ndarray:
    """A random voxel (as a float index) among ``candidates``; the deepest voxels if there are none."""
    points = np.argwhere(candidates)
    if not len(points):
        points = np.argwhere(depth >= depth.max() - 1) if prefer_deep else np.argwhere(depth > 0)
    return points[rng.integers(len(points))].astype(np.float32)


def _far_from(point: np.ndarray, shape: tuple[int, ...], distance: float) -> np.ndarray:
    coords = np.indices(shape, dtype=np.float32)
    return ((coords - point.reshape(3, 1, 1, 1)) ** 2).sum(axis=0) >= distance**2


def _noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth Gaussian noise of unit standard deviation and correlation length ~``sigma`` voxels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _blob(
    shape: tuple[int, ...],
    centre: np.ndarray,
    axes: np.ndarray,
    rotation: np.ndarray,
    noise: np.ndarray,
    irregularity: float,
) -> np.ndarray:
    """A soft ellipsoid whose boundary is perturbed by ``noise`` (irregular, lobulated outline)."""
    offset = np.indices(shape, dtype=np.float32) - centre.reshape(3, 1, 1, 1)
    local = np.tensordot(rotation.T.astype(np.float32), offset, axes=1)
    distance = np.sqrt(((local / axes.reshape(3, 1, 1, 1).astype(np.float32)) ** 2).sum(axis=0))
    # Noise clipped: a lobulated outline, but no islands far from the blob.
    return _logistic(distance + irregularity * np.clip(noise, -2, 2), float(np.mean(axes)))


def _logistic(distance: np.ndarray, radius: float) -> np.ndarray:
    """1 inside (``distance``, in units of ``radius`` voxels, < 1), 0 outside, with a soft partial-volume
    edge ~``EDGE_VOXELS`` wide; exactly 0 below 1 %, so that tissue away from the lesion is left untouched."""
    weight = 1 / (1 + np.exp(np.clip((distance - 1) * radius / EDGE_VOXELS, -50, 50)))
    return np.where(weight >= 0.01, weight, 0).astype(np.float32)
