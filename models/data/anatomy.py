"""New anatomies from tissue maps: random smooth diffeomorphic deformations, in the spirit of SynthSeg.

A handful of template brains gives a model a handful of anatomies; everything a healthy brain varies in
beyond an affine transform (the shape of the cortex and gyri, the size of the ventricles, the proportions
of the lobes) it has to see to leave it unflagged. SynthSeg (Billot et al., Medical Image Analysis 2023)
trains on label maps warped by random smooth deformations and painted with random intensities; here the
same is done to the CSF/GM/WM probability maps on the model grid, which keep partial volume.

Two deformations, composed in one stationary velocity field and integrated by scaling and squaring (so the
warp is a diffeomorphism: no folding, no tearing, tissue topology kept):

- a smooth random field on a coarse grid (lobe proportions, gyral shape, brain shape);
- a radial expansion or shrinkage about the lateral ventricles (ventricle size varies most between healthy
  adults, with age; Gaussian envelope so the cortex is hardly moved by it).

Cost: ~0.6 s a volume on one thread beside other work; a pool volume is rebuilt every ~3 training steps of ~3 s
(``tests/benchmarks/bench_anatomy.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

VENTRICLE_DEPTH_VOX = 6.0  # CSF at least this deep in the brain (model voxels, 2 mm) is ventricle, not sulci


@dataclass(frozen=True)
class AnatomyConfig:
    """Ranges of the random anatomy; the defaults stay within healthy adult variation."""

    velocity_vox: float = 3.0  # std of the velocity field at its coarse nodes, model voxels (2 mm)
    velocity_grid: int = 5  # coarse nodes per axis: features ~20 voxels across (lobes, gyral groups)
    squarings: int = 6  # scaling and squaring steps: 2^6 small steps integrate the field
    ventricle_scale: tuple[float, float] = (0.75, 1.6)  # linear scale range of the ventricles (log-uniform)
    ventricle_reach_vox: float = 14.0  # sigma of the Gaussian envelope of the ventricle deformation


def random_anatomy(
    tissue: Tensor, brain_mask: Tensor, config: AnatomyConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``tissue`` (3, D, H, W) CSF/GM/WM probabilities and ``brain_mask`` (D, H, W) through one random
    diffeomorphism: (tissue renormalised inside the new mask, mask). A pure function of the generator."""
    shape = tuple(brain_mask.shape)
    velocity = _random_velocity(shape, config, generator)
    velocity = velocity + _ventricle_velocity(tissue, brain_mask, config, generator)
    displacement = _integrate(velocity, config.squarings)
    stack = torch.cat([tissue.float(), brain_mask.float()[None]])[None]
    warped = _warp(stack, displacement)[0]
    mask = warped[3] > 0.5
    new_tissue = warped[:3] * mask
    new_tissue = new_tissue / new_tissue.sum(dim=0, keepdim=True).clamp(min=1e-6)
    return new_tissue * mask, mask


def _random_velocity(shape: tuple[int, ...], config: AnatomyConfig, generator: torch.Generator) -> Tensor:
    """(3, D, H, W) in voxels, (x, y, z) components: a coarse Gaussian grid upsampled smoothly."""
    nodes = max(config.velocity_grid, 2)
    coarse = config.velocity_vox * torch.randn((1, 3, nodes, nodes, nodes), generator=generator)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0]


def _ventricle_velocity(
    tissue: Tensor, brain_mask: Tensor, config: AnatomyConfig, generator: torch.Generator
) -> Tensor:
    """A radial field about the ventricles' centre: v(p) = -log(s) (p - c) exp(-|p - c|^2 / 2 r^2).

    Integrated, it scales the neighbourhood of c by about s (reading from closer to c enlarges); zero when
    no deep CSF is found (a partial slab without the ventricles).
    """
    shape = tuple(brain_mask.shape)
    low, high = config.ventricle_scale
    scale = math.exp(math.log(low) + (math.log(high) - math.log(low)) * float(torch.rand((), generator=generator)))
    depth = _depth(brain_mask)
    ventricles = (tissue[0] > 0.5) & (depth >= VENTRICLE_DEPTH_VOX)
    if not bool(ventricles.any()):
        return torch.zeros((3, *shape))
    points = _voxel_points(shape)  # (3, D, H, W) as (x, y, z)
    centre = points[:, ventricles].mean(dim=1).view(3, 1, 1, 1)
    offset = points - centre
    envelope = torch.exp(-(offset**2).sum(dim=0) / (2 * config.ventricle_reach_vox**2))
    return -math.log(scale) * offset * envelope


def _depth(mask: Tensor) -> Tensor:
    """Approximate distance in voxels to the outside of the mask: repeated 3x3x3 erosions, capped at 12."""
    inside = mask.float()[None, None]
    depth = torch.zeros_like(inside)
    for _ in range(12):
        depth += inside
        inside = -F.max_pool3d(-inside, kernel_size=3, stride=1, padding=1)
    return depth[0, 0]


def _voxel_points(shape: tuple[int, ...]) -> Tensor:
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    return torch.stack([x, y, z])


def _integrate(velocity: Tensor, squarings: int) -> Tensor:
    """exp(v) by scaling and squaring: u = v / 2^n, then n times u(p) <- u(p) + u(p + u(p))."""
    displacement = velocity / (2**squarings)
    for _ in range(squarings):
        displacement = displacement + _warp(displacement[None], displacement)[0]
    return displacement


def _warp(stack: Tensor, displacement: Tensor) -> Tensor:
    """``stack`` (1, C, D, H, W) read at p + displacement(p) (voxels, (x, y, z)); zeros outside."""
    shape = tuple(stack.shape[2:])
    points = _voxel_points(shape) + displacement
    sizes = torch.tensor([shape[2], shape[1], shape[0]], dtype=torch.float32).view(3, 1, 1, 1)
    normalised = 2 * points / (sizes - 1) - 1
    grid = normalised.permute(1, 2, 3, 0)[None]  # (1, D, H, W, 3) as (x, y, z)
    return F.grid_sample(stack, grid, mode="bilinear", padding_mode="border", align_corners=True)
