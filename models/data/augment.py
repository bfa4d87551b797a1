"""Random augmentation of a training volume on the model grid: new anatomy shapes and new scanner looks.

With a handful of healthy brains the model otherwise memorises them. Spatially, one resampling applies
a random affine (what registration leaves behind) and a smooth elastic displacement (anatomical
variation) to the image, brain mask and tissue maps together. A synthetic sample (always when the volume
was not acquired in the model's contrast, sometimes otherwise) then gets a new anatomy (models/data/anatomy.py)
and is painted from its tissue maps (models/data/synthesis.py). Then the intensities get what scanners and
sites vary in: bias field, gamma, blur, ghosting and Rician noise. Last, the preprocessing's own intensity
scaling inside the mask (the version the volume was preprocessed with), so an augmented volume is
indistinguishable in range and background from a real preprocessed one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from models.data.anatomy import AnatomyConfig, random_anatomy
from models.data.synthesis import CONTRASTS, Contrast, synthesise_contrast
from models.data.volumes import TrainingVolume
from models.preprocessing.intensity import normalise

BIAS_GRID = (3, 4, 4)  # coarse grid of the bias field (z, y, x): varies over the whole brain, not locally
THROUGH_PLANE_ROTATION = 0.3  # through-plane rotation as a fraction of ``rotation_deg``


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of every random change; the defaults keep samples looking like real preprocessed volumes."""

    rotation_deg: float = 8.0  # max in-plane (axial) rotation; through-plane is 0.3 of it (registration residue)
    scale: float = 0.06  # max relative scale change per axis (affine registration already matches size)
    translation_vox: float = 3.0  # max shift per axis, model voxels (2 mm)
    elastic_vox: float = 1.5  # std of the elastic displacement at the coarse grid nodes, model voxels
    elastic_grid: int = 6  # coarse grid nodes per axis: ~16 voxels apart in plane, smooth folds not noise
    gamma: tuple[float, float] = (0.7, 1.4)  # gamma exponent range, drawn log-uniformly (contrast curve)
    bias_field: float = 0.2  # std of the log bias field at its coarse nodes (residual after N4)
    blur_sigma_vox: tuple[float, float] = (0.3, 1.0)  # Gaussian blur sigma range, drawn per in-plane / z
    blur_probability: float = 0.25  # chance of blurring (thick slices, lower resolution scanners)
    ghosting_probability: float = 0.15  # chance of a phase-encode ghost (motion, pulsation)
    ghosting_intensity: tuple[float, float] = (0.03, 0.15)  # ghost amplitude relative to the image
    noise_std: tuple[float, float] = (0.0, 0.03)  # Rician noise sigma range, relative to the brightest tissue
    synthetic_probability: float = 0.3  # chance a volume of the model's own contrast is painted anyway
    anatomy_probability: float = 0.8  # chance a synthetic sample gets a new anatomy before it is painted
    anatomy: AnatomyConfig = field(default_factory=AnatomyConfig)


def augment_volume(
    volume: TrainingVolume, config: AugmentConfig, generator: torch.Generator, contrast: str = "t1"
) -> tuple[Tensor, Tensor]:
    """A random ``contrast`` sample made from ``volume``: (image (D, H, W) float32 in [0, 1], 0 outside the mask;
    mask bool).

    A pure function of the generator's state: the same seed gives the same sample. A volume not acquired in
    ``contrast`` needs its tissue maps (every sample of it is synthetic).
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {', '.join(CONTRASTS)}")
    own = volume.contrast == contrast
    if not own and volume.tissue is None:
        raise ValueError(f"{volume.name}: a {contrast} sample is synthesised from tissue maps, and it has none")
    image, mask, tissue = _warp(volume, config, generator)
    synthetic = not own or (tissue is not None and _chance(config.synthetic_probability, generator))
    if synthetic:
        assert tissue is not None  # checked above for other contrasts; drawn only with tissue for its own
        if _chance(config.anatomy_probability, generator):
            tissue, mask = random_anatomy(tissue, mask, config.anatomy, generator)
        image = synthesise_contrast(tissue, cast(Contrast, contrast), generator)
    image = image * _bias_field(image.shape, config.bias_field, generator)
    image = _gamma(image, mask, config.gamma, generator)
    if _chance(config.blur_probability, generator):
        image = _blur(image, config.blur_sigma_vox, generator)
    if _chance(config.ghosting_probability, generator):
        image = _ghost(image, config.ghosting_intensity, generator)
    image = _rician_noise(image, config.noise_std, generator)
    mask_array = mask.numpy()
    # the preprocessing's own scaling, exactly
    normalised = normalise(image.numpy(), mask_array, volume.scaling, contrast)
    return torch.from_numpy(normalised), mask


# --- spatial ---------------------------------------------------------------------------------------------


def _warp(
    volume: TrainingVolume, config: AugmentConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Image, mask and tissue through one random affine + elastic resampling (one ``grid_sample``)."""
    channels = [torch.from_numpy(volume.volume).float(), torch.from_numpy(volume.brain_mask).float()]
    if volume.tissue is not None:
        channels.extend(torch.from_numpy(volume.tissue).float())
    stack = torch.stack(channels)[None]  # (1, C, D, H, W)
    shape = tuple(stack.shape[2:])
    grid = _sampling_grid(shape, config, generator)  # type: ignore[arg-type]
    warped = F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    mask = warped[1] > 0.5
    image = warped[0] * mask
    tissue = None
    if volume.tissue is not None:
        tissue = warped[2:] * mask
        tissue = tissue / tissue.sum(dim=0, keepdim=True).clamp(min=1e-6)
    return image, mask, tissue


def _sampling_grid(shape: tuple[int, int, int], config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """For every output voxel, where to read the source: (1, D, H, W, 3) normalised (x, y, z) coordinates.

    Built in voxel units about the volume centre (voxels are isotropic, so rotations stay rigid), then
    scaled to grid_sample's [-1, 1].
    """
    depth, height, width = shape
    half = torch.tensor([(width - 1) / 2, (height - 1) / 2, (depth - 1) / 2])
    z, y, x = torch.meshgrid(
        torch.arange(depth, dtype=torch.float32),
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing="ij",
    )
    points = torch.stack([x, y, z], dim=-1) - half  # (D, H, W, 3)
    in_plane = math.radians(config.rotation_deg)
    through = in_plane * THROUGH_PLANE_ROTATION
    angles = [_symmetric(through, generator), _symmetric(through, generator), _symmetric(in_plane, generator)]
    scales = torch.tensor([1.0 + _symmetric(config.scale, generator) for _ in range(3)])
    matrix = _rotation(*angles) @ torch.diag(scales)
    shift = torch.tensor([_symmetric(config.translation_vox, generator) for _ in range(3)])
    source = points @ matrix.T + shift
    if config.elastic_vox > 0:
        nodes = max(config.elastic_grid, 2)
        coarse = config.elastic_vox * torch.randn((1, 3, nodes, nodes, nodes), generator=generator)
        displacement = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0]
        source = source + displacement.permute(1, 2, 3, 0)
    return (source / half)[None]


def _rotation(about_x: float, about_y: float, about_z: float) -> Tensor:
    cx, sx, cy, sy, cz, sz = (f(a) for a in (about_x, about_y, about_z) for f in (math.cos, math.sin))
    rx = torch.tensor([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = torch.tensor([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rz = torch.tensor([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return rz @ ry @ rx


# --- intensity -------------------------------------------------------------------------------------------


def _bias_field(shape: torch.Size, strength: float, generator: torch.Generator) -> Tensor:
    """A smooth multiplicative field, exp of a coarse random grid upsampled to the volume."""
    coarse = strength * torch.randn((1, 1, *BIAS_GRID), generator=generator)
    return torch.exp(F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0])


def _gamma(image: Tensor, mask: Tensor, gamma: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Image scaled to its brain maximum, raised to a log-uniform gamma: bends the contrast curve."""
    peak = image[mask].max() if bool(mask.any()) else image.max()
    exponent = math.exp(_uniform(math.log(gamma[0]), math.log(gamma[1]), generator))
    return (image / peak.clamp(min=1e-6)).clamp(min=0.0) ** exponent


def _blur(image: Tensor, sigma_range: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Separable Gaussian blur: one sigma in plane, another through plane (thick-slice look)."""
    in_plane = _uniform(*sigma_range, generator)
    through = _uniform(*sigma_range, generator)
    out = image[None, None]
    for axis, sigma in ((2, through), (3, in_plane), (4, in_plane)):
        radius = max(1, math.ceil(3 * sigma))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = kernel / kernel.sum()
        kernel_shape = [1, 1, 1, 1, 1]
        kernel_shape[axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis - 2] = radius
        out = F.conv3d(out, kernel.view(kernel_shape), padding=tuple(padding))
    return out[0, 0]


def _ghost(image: Tensor, intensity: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Ghosts along the phase-encode axis of each axial slice, made in k-space as a scanner makes them.

    Scaling every n-th phase-encode line by (1 + n·a·e^{iφ}) adds n faint copies of the slice, shifted
    by multiples of N/n and of amplitude a (a periodic k-space error, as from motion or pulsation).
    """
    axis = 1 if _chance(0.5, generator) else 2  # phase encode: anterior-posterior or left-right
    count = 2 + int(torch.randint(0, 3, (), generator=generator))
    amplitude = _uniform(*intensity, generator)
    phase = _uniform(0.0, 2 * math.pi, generator)
    spectrum = torch.fft.fft(image.to(torch.complex64), dim=axis)
    lines = image.shape[axis]
    modulation = torch.ones(lines, dtype=torch.complex64)
    modulation[::count] += count * amplitude * complex(math.cos(phase), math.sin(phase))
    view = [1, 1, 1]
    view[axis] = lines
    return torch.fft.ifft(spectrum * modulation.view(view), dim=axis).abs()


def _rician_noise(image: Tensor, std: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Magnitude of the image plus complex Gaussian noise: Rician, as MR magnitude images are."""
    sigma = _uniform(*std, generator)
    if sigma <= 0:
        return image
    real = image + sigma * torch.randn(tuple(image.shape), generator=generator)
    imaginary = sigma * torch.randn(tuple(image.shape), generator=generator)
    return torch.sqrt(real * real + imaginary * imaginary)


# --- random draws ----------------------------------------------------------------------------------------


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _symmetric(limit: float, generator: torch.Generator) -> float:
    return _uniform(-limit, limit, generator)


def _chance(probability: float, generator: torch.Generator) -> bool:
    return float(torch.rand((), generator=generator)) < probability
