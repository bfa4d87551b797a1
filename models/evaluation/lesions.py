"""Simulated lesions on model-grid volumes of a known contrast, for evaluation: no lesioned scan exists offline.

The simulator works in *unscaled* intensities (the model-grid volume before intensity scaling, in whatever
units the scanner or painter gave), as a lesion is part of the scan the node receives: the evaluation scales
each case afterwards with the evaluated model's own preprocessing, so the lesion takes part in the scaling as
in a real scan (a large bright lesion moves the 99th percentile of version 1 and is clipped by it, while
version 2's median hardly moves). Nothing here assumes a range: every level is a ratio to a tissue level
measured on the volume itself (a 3-class k-means of the brain's intensities, named by the contrast's tissue
order), so the same lesion has the same contrast whatever the units. On Colin27 (T1) the levels come out near
CSF 72, GM 103, WM 131.

Lesion levels, as ratios to the contrast's own tissue levels (lesion/tissue contrast ratios as radiology
describes them; ranges are drawn per lesion):

- T1 (CSF < GM < WM). ``tumour`` dark: a necrotic or cystic core, CSF-like (0.94-1.12 x CSF), in oedema that
  darkens white matter half-way towards grey matter (oedema lengthens T1). ``tumour`` bright: enhancing
  tumour or subacute (methaemoglobin) blood, 1.15-1.5 x WM, in a thinner, subtler darkening rim.
  ``wmh`` dark: GM-like, as white-matter hyperintensities look on T1; ``wmh`` bright: 1.15-1.3 x WM (a
  hyperintense focus, kept so bright lesions exist in white matter too). ``stroke`` dark: a CSF-like
  (0.94-1.06 x CSF) territorial infarct.
- FLAIR (CSF dark, WM < GM). Hyperintensity is the main finding. ``tumour`` bright: a core of 1.3-1.8 x GM
  in vasogenic oedema of 1.1-1.35 x GM (oedema and non-enhancing tumour are FLAIR-bright, above grey
  matter). ``wmh`` bright: 1.15-1.5 x GM (~1.7-2.2 x WM), the classic FLAIR finding. ``stroke`` bright: a
  subacute infarct, 1.2-1.5 x GM. ``stroke`` dark: a chronic infarct's encephalomalacia, fluid suppressed
  like CSF (1.0-1.5 x CSF).
- T2 (WM < GM < CSF). ``tumour`` bright: a necrotic or cystic core near fluid (0.75-0.95 x CSF) in oedema
  of 1.15-1.4 x GM (T2-bright, below CSF). ``tumour`` dark: a haemorrhagic core (deoxyhaemoglobin,
  haemosiderin shorten T2) at 0.4-0.75 x WM, in a thinner, subtler bright oedema rim. ``wmh`` bright:
  1.15-1.45 x GM; ``stroke`` bright: a subacute infarct, 1.2-1.5 x GM.

Oedema only ever moves tissue towards its level (darkens on T1, brightens on T2/FLAIR), spreads along white
matter (full strength there, fainter in grey matter, none in CSF) and, around a core of the other polarity,
is thinner (0.6 x), 0.6 x as strong and confined to white matter, so that the lesion as a whole keeps its
core's polarity (most of its changed voxels move the core's way).

Kinds (sizes are diameters; the model grid has 2 mm voxels, 0.008 mL):

- ``tumour``: an irregular (noise-perturbed) core 20-40 mm across with texture, inside a rim of oedema
  5-12 mm thick. Placed away from the brain's edge. Changed volume ~9-60 mL on T1, up to ~90 mL on T2 and
  FLAIR, where the oedema brightens grey matter too (BraTS-like sizes).
- ``wmh``: 3-8 ovoids 6-12 mm in white matter. Changed volume ~0.3-1.5 mL: small for a 2 mm grid and a
  5x5x5 median, as real WMH are.
- ``stroke``: a wedge 20-40 mm across whose base lies on the cortex and whose apex points into the brain,
  as a territorial infarct. Changed volume ~4-25 mL.

Edges are soft (a logistic fall-off of ~1 voxel, like partial volume) and lesions carry a little texture
(its amplitude a fraction of the GM-WM difference). Intensities stay >= 0 and are never clipped above; the
volume outside the brain is left as it was. The mask holds the voxels that really changed: lesion weight
>= 0.5, inside the brain, and a noise-free change of at least ``MIN_VISIBLE_CHANGE`` x |GM - WM| *before*
scaling, so the ground truth is the same whichever preprocessing version a model has (a version that clips
a bright lesion away is the worse for it, not the truth) and a lesion painted onto tissue of its own
intensity leaves no invisible ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

Polarity = Literal["dark", "bright"]
# T1 kinds (cycled by the evaluation set); balanced dark/bright.
LESION_KINDS: tuple[tuple[str, Polarity], ...] = (
    ("tumour", "dark"),
    ("tumour", "bright"),
    ("wmh", "dark"),
    ("wmh", "bright"),
    ("stroke", "dark"),
)
# Per contrast; on FLAIR and T2 hyperintense lesions are the main case (three of four kinds).
KINDS_BY_CONTRAST: dict[str, tuple[tuple[str, Polarity], ...]] = {
    "t1": LESION_KINDS,
    "flair": (("tumour", "bright"), ("wmh", "bright"), ("stroke", "bright"), ("stroke", "dark")),
    "t2": (("tumour", "bright"), ("tumour", "dark"), ("wmh", "bright"), ("stroke", "bright")),
}
# Tissue classes from darkest to brightest, per contrast: how the k-means clusters are named.
TISSUE_ORDER = {"t1": ("csf", "gm", "wm"), "t2": ("wm", "gm", "csf"), "flair": ("csf", "wm", "gm")}
VOXEL_MM = 2.0
MIN_VISIBLE_CHANGE = 1 / 6  # x |GM - WM| of the unscaled volume (0.05 of the old v1-normalised T1 range)
EDGE_VOXELS = 0.3  # logistic width of the soft edge, in voxels: ~1 voxel of partial volume
TUMOUR_CORE_MM = (20.0, 40.0)
TUMOUR_OEDEMA_MM = (5.0, 12.0)
WMH_COUNT = (3, 8)
WMH_MM = (6.0, 12.0)
STROKE_MM = (20.0, 40.0)
OPPOSITE_OEDEMA = 0.6  # thickness and strength of oedema around a core of the other polarity
T1_OEDEMA_DEPTH = 0.5  # T1 oedema: WM darkened this fraction of the way to GM
# Texture standard deviations, x |GM - WM|.
CORE_TEXTURE, OEDEMA_TEXTURE, WMH_TEXTURE, STROKE_TEXTURE = 0.16, 0.08, 0.1, 0.125


@dataclass(frozen=True)
class Ratio:
    """A level drawn as ``tissue`` level x U(low, high): a lesion-to-tissue contrast ratio."""

    tissue: str
    low: float
    high: float

    def draw(self, levels: TissueLevels, rng: np.random.Generator) -> float:
        base = getattr(levels, self.tissue)
        return base * (self.low if self.low == self.high else rng.uniform(self.low, self.high))


# The level of each lesion (a tumour's core) by (contrast, kind, polarity); see the module docstring.
LEVELS: dict[tuple[str, str, str], Ratio] = {
    ("t1", "tumour", "dark"): Ratio("csf", 0.94, 1.12),
    ("t1", "tumour", "bright"): Ratio("wm", 1.15, 1.5),
    ("t1", "wmh", "dark"): Ratio("gm", 1.0, 1.0),
    ("t1", "wmh", "bright"): Ratio("wm", 1.15, 1.3),
    ("t1", "stroke", "dark"): Ratio("csf", 0.94, 1.06),
    ("flair", "tumour", "bright"): Ratio("gm", 1.3, 1.8),
    ("flair", "wmh", "bright"): Ratio("gm", 1.15, 1.5),
    ("flair", "stroke", "bright"): Ratio("gm", 1.2, 1.5),
    ("flair", "stroke", "dark"): Ratio("csf", 1.0, 1.5),
    ("t2", "tumour", "bright"): Ratio("csf", 0.75, 0.95),
    ("t2", "tumour", "dark"): Ratio("wm", 0.4, 0.75),
    ("t2", "wmh", "bright"): Ratio("gm", 1.15, 1.45),
    ("t2", "stroke", "bright"): Ratio("gm", 1.2, 1.5),
}
# Vasogenic oedema around a tumour on T2 and FLAIR (bright); T1's darkening uses ``T1_OEDEMA_DEPTH``.
OEDEMA_LEVELS = {"flair": Ratio("gm", 1.1, 1.35), "t2": Ratio("gm", 1.15, 1.4)}


@dataclass(frozen=True, eq=False)
class SimulatedLesion:
    """A volume with one simulated lesion (or a cluster, for WMH) and the voxels that it changed."""

    image: np.ndarray  # float32, the input's units (>= 0 inside the brain); outside the brain as the input
    mask: np.ndarray  # bool: the voxels the lesion visibly changed
    kind: str
    polarity: Polarity


@dataclass(frozen=True)
class TissueLevels:
    """Mean intensities of the three tissue classes in one volume, in the volume's units."""

    csf: float
    gm: float
    wm: float

    @property
    def contrast_unit(self) -> float:
        """|GM - WM|: the contrast every model must see, the unit of visibility and texture."""
        return abs(self.gm - self.wm)

    @property
    def brightest(self) -> float:
        return max(self.csf, self.gm, self.wm)


def lesion_kinds(contrast: str) -> tuple[tuple[str, Polarity], ...]:
    """The (kind, polarity) pairs simulated for ``contrast``, in the order the evaluation set cycles them."""
    if contrast not in KINDS_BY_CONTRAST:
        raise ValueError(f"no lesion kinds for contrast {contrast!r}; known: {', '.join(KINDS_BY_CONTRAST)}")
    return KINDS_BY_CONTRAST[contrast]


def tissue_levels(volume: np.ndarray, brain_mask: np.ndarray, contrast: str = "t1") -> TissueLevels:
    """CSF, GM and WM levels by a 1D 3-class k-means of the brain's intensities (robust to the subject), the
    clusters named by ``contrast``'s tissue order."""
    if contrast not in TISSUE_ORDER:
        raise ValueError(f"no tissue order for contrast {contrast!r}; known: {', '.join(TISSUE_ORDER)}")
    values = volume[brain_mask].astype(np.float64)
    centres = np.percentile(values, [10, 50, 90])
    for _ in range(30):
        labels = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        updated = np.array([values[labels == k].mean() if np.any(labels == k) else centres[k] for k in range(3)])
        converged = np.allclose(updated, centres, rtol=1e-6, atol=1e-5 * max(float(np.abs(centres).max()), 1e-12))
        centres = updated
        if converged:
            break
    named = dict(zip(TISSUE_ORDER[contrast], (float(c) for c in np.sort(centres)), strict=True))
    return TissueLevels(csf=named["csf"], gm=named["gm"], wm=named["wm"])


def white_matter(
    volume: np.ndarray, brain_mask: np.ndarray, levels: TissueLevels | None = None, contrast: str = "t1"
) -> np.ndarray:
    """Voxels that are white matter by intensity (lightly smoothed, nearer WM than either neighbouring tissue
    level in the contrast's order), eroded once."""
    levels = levels or tissue_levels(volume, brain_mask, contrast)
    smooth = ndimage.gaussian_filter(volume.astype(np.float32), 0.5)
    ordered = sorted((levels.csf, levels.gm, levels.wm))
    rank = ordered.index(levels.wm)
    low = (ordered[rank - 1] + levels.wm) / 2 if rank > 0 else -np.inf
    high = (ordered[rank + 1] + levels.wm) / 2 if rank < 2 else np.inf
    wm = brain_mask & (smooth > low) & (smooth < high)
    return ndimage.binary_erosion(wm)


def simulate_lesion(
    volume: np.ndarray,
    brain_mask: np.ndarray,
    kind: str,
    polarity: str,
    rng: np.random.Generator,
    contrast: str = "t1",
    levels: TissueLevels | None = None,
) -> SimulatedLesion:
    """``volume`` (unscaled, of ``contrast``) with one simulated lesion of ``kind`` / ``polarity`` (see
    ``lesion_kinds``); same rng, same lesion. ``levels``: the volume's tissue levels, when already measured."""
    if (kind, polarity) not in lesion_kinds(contrast):
        raise ValueError(f"no {polarity} {kind} lesion on {contrast}; the kinds are {lesion_kinds(contrast)}")
    brain = np.asarray(brain_mask, dtype=bool)
    if not brain.any():
        raise ValueError("the brain mask is empty")
    volume = np.asarray(volume, dtype=np.float32)
    levels = levels or tissue_levels(volume, brain, contrast)
    unit = levels.contrast_unit
    if unit <= 0:
        raise ValueError("grey and white matter have the same level: no contrast to simulate a lesion in")
    painter = {"tumour": _tumour, "wmh": _wmh, "stroke": _stroke}[kind]
    layers = painter(volume, brain, levels, contrast, polarity, rng)
    minimum = MIN_VISIBLE_CHANGE * unit
    clean = volume.copy()
    textured = volume.copy()
    for weight, _, level, texture in layers:
        # Texture only where the layer visibly changes the tissue: no invisible lesion, no speckle around it.
        visible = np.clip(np.abs(level - clean) / (2 * minimum), 0, 1)
        clean = (1 - weight) * clean + weight * level
        textured = (1 - weight) * textured + weight * (level + visible * texture * unit)
    extent = np.maximum.reduce([layer[1] for layer in layers])
    changed = np.abs(np.maximum(clean, 0) - volume) >= minimum
    mask = brain & (extent >= 0.5) & changed
    image = np.where(brain, np.maximum(textured, 0), volume).astype(np.float32)
    return SimulatedLesion(image=image, mask=mask, kind=kind, polarity=polarity)  # type: ignore[arg-type]


# A layer: (weight in [0, 1], the lesion's geometric extent in [0, 1] (the weight before any tissue
# modulation: what the ground truth covers), target level, texture (unit std, x |GM - WM|) added to the level).
_Layer = tuple[np.ndarray, np.ndarray, float | np.ndarray, np.ndarray]


def _tumour(
    volume: np.ndarray,
    brain: np.ndarray,
    levels: TissueLevels,
    contrast: str,
    polarity: str,
    rng: np.random.Generator,
) -> list[_Layer]:
    oedema_bright = contrast != "t1"  # oedema lengthens T1 and T2: dark on T1, bright on T2 and FLAIR
    opposite = oedema_bright != (polarity == "bright")
    core_radius = rng.uniform(*TUMOUR_CORE_MM) / 2 / VOXEL_MM
    oedema = rng.uniform(*TUMOUR_OEDEMA_MM) / VOXEL_MM
    if opposite:  # a thinner rim around a core of the other polarity: the lesion as a whole keeps the core's
        oedema *= OPPOSITE_OEDEMA
    depth = np.asarray(ndimage.distance_transform_edt(brain))
    centre = _pick(depth >= core_radius + 0.5 * oedema + 1, depth, rng)
    axes = core_radius * rng.uniform(0.75, 1.25, size=3)
    rotation = _random_rotation(rng)
    core = _blob(brain.shape, centre, axes, rotation, _noise(brain.shape, 2.0, rng), 0.25)
    outer = _blob(brain.shape, centre, axes + oedema, rotation, _noise(brain.shape, 2.5, rng), 0.3)
    wm_weight = _white_matter_weight(volume, levels)
    # Oedema spreads along white matter; around a core of the other polarity it stays there (a thin rim).
    oedema_weight = outer * (wm_weight if opposite else 0.4 + 0.6 * wm_weight) * brain
    strength = OPPOSITE_OEDEMA if opposite else 1.0
    if oedema_bright:
        target = OEDEMA_LEVELS[contrast].draw(levels, rng)
        oedema_level = np.maximum(volume, levels.gm + strength * (target - levels.gm))
    else:  # intermediate between GM and WM, only ever darkening
        oedema_level = np.minimum(volume, levels.wm - strength * T1_OEDEMA_DEPTH * (levels.wm - levels.gm))
    core_level = LEVELS[(contrast, "tumour", polarity)].draw(levels, rng)
    texture = CORE_TEXTURE * _noise(brain.shape, 1.0, rng)
    oedema_texture = OEDEMA_TEXTURE / CORE_TEXTURE * texture
    return [(oedema_weight, outer, oedema_level, oedema_texture), (core * brain, core, core_level, texture)]


def _white_matter_weight(volume: np.ndarray, levels: TissueLevels) -> np.ndarray:
    """1 at the WM level, falling to 0 at the GM level and, where CSF lies on WM's side of GM (FLAIR), at the
    CSF level: oedema spreads along white matter, less in grey matter and not into CSF."""
    weight = np.clip((volume - levels.gm) / (levels.wm - levels.gm), 0, 1)
    if (levels.csf - levels.gm) * (levels.wm - levels.gm) > 0:
        weight = weight * np.clip((volume - levels.csf) / (levels.wm - levels.csf), 0, 1)
    return weight


def _wmh(
    volume: np.ndarray,
    brain: np.ndarray,
    levels: TissueLevels,
    contrast: str,
    polarity: str,
    rng: np.random.Generator,
) -> list[_Layer]:
    wm = white_matter(volume, brain, levels, contrast)
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
    level = LEVELS[(contrast, "wmh", polarity)].draw(levels, rng)
    return [(weight, extent, level, WMH_TEXTURE * _noise(brain.shape, 1.0, rng))]


def _stroke(
    volume: np.ndarray,
    brain: np.ndarray,
    levels: TissueLevels,
    contrast: str,
    polarity: str,
    rng: np.random.Generator,
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
    level = LEVELS[(contrast, "stroke", polarity)].draw(levels, rng)
    return [(weight, weight, level, STROKE_TEXTURE * _noise(brain.shape, 1.0, rng))]


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
