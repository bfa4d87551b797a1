"""Multi-octave 3D simplex noise as a batched torch op: the structured noise that replaces Gaussian noise in cDDPM.

Why simplex noise: Gaussian noise is white, so a model trained to remove it learns to restore fine texture and
can "repair" large lesions only poorly; low-frequency simplex noise destroys whole regions, so the model learns to
re-draw healthy anatomy there (AnoDDPM, Wyatt et al. 2022; used by cDDPM).

Own vectorised implementation of Gustavson's 3D simplex noise: skew the point into the simplex lattice, find the
enclosing tetrahedron, hash its 4 corners through a permutation table to one of 12 edge gradients, and sum
``max(0, 0.5 - r^2)^4 · (gradient · offset)`` over the corners (the 0.5 radius keeps the field continuous).

Every (sample, channel) field gets its own random permutation table and, per octave, its own random continuous
offset of the lattice in x, y and z; the z offset plays the role of the reference code's third coordinate.

``frequency`` follows the AnoDDPM-derived reference code: it is the coarsest octave's lattice period in pixels.
Octave k (k = 0 .. octaves-1) samples the lattice at ``pixel · 2^k / frequency`` and has amplitude
``persistence^k``. With frequency 64 on a 96 px slice the coarsest octave spans 1.5 lattice cells and the sixth
spans 48 (2 px per cell). The sum is standardised per field to mean 0, std 1 so that it can stand in for
N(0, 1) noise in q(x_t | x_0).
"""

from __future__ import annotations

import torch
from torch import Tensor

SKEW = 1.0 / 3.0  # F3: the factor that maps the cube lattice onto the simplex lattice
UNSKEW = 1.0 / 6.0  # G3
FALLOFF_RADIUS2 = 0.5  # squared radius of each corner's influence; 0.5 makes the field continuous
TABLE = 256  # permutation period of the lattice hash
GRADIENTS = (
    (1, 1, 0), (-1, 1, 0), (1, -1, 0), (-1, -1, 0),
    (1, 0, 1), (-1, 0, 1), (1, 0, -1), (-1, 0, -1),
    (0, 1, 1), (0, -1, 1), (0, 1, -1), (0, -1, -1),
)  # fmt: skip
STD_EPS = 1e-12
CHUNK_ELEMENTS = 1 << 17  # points per vectorised block on CPU (see simplex_noise)


def simplex_noise(
    shape: tuple[int, int, int, int],
    generator: torch.Generator,
    octaves: int,
    persistence: float,
    frequency: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standardised multi-octave simplex noise of ``shape`` (B, C, H, W), one independent field per (b, c).

    All randomness comes from ``generator`` and the work runs on its device, so one seed gives one tensor;
    ``device`` (default: the generator's) is where the result is returned. All octaves are evaluated in one
    batched pass rather than a loop, because on CPU the cost is dominated by the number of elementwise ops.
    """
    if len(shape) != 4:
        raise ValueError(f"simplex noise needs a (B, C, H, W) shape, got {shape}")
    if octaves < 1 or frequency <= 0:
        raise ValueError(f"need octaves >= 1 and frequency > 0, got {octaves} and {frequency}")
    batch, channels, height, width = shape
    out_device = torch.device(device) if device is not None else generator.device
    work = generator.device
    fields = batch * channels
    layers = octaves * fields  # one noise layer per (octave, field), octave-major

    perm = torch.argsort(torch.rand((fields, TABLE), generator=generator, device=work), dim=1)
    offsets = torch.rand((octaves, fields, 3), generator=generator, device=work, dtype=torch.float64) * TABLE
    tables = _Tables.build(perm.to(torch.int32), octaves)

    scales = (2.0 ** torch.arange(octaves, device=work, dtype=torch.float64)) / frequency  # lattice units per pixel
    scales = scales.view(octaves, 1, 1, 1)
    offsets = offsets.view(octaves, fields, 3, 1, 1)
    cols = torch.arange(width, device=work, dtype=torch.float64).view(1, 1, 1, width)
    rows = torch.arange(height, device=work, dtype=torch.float64).view(1, 1, height, 1)
    x = (cols * scales + offsets[:, :, 0]).float().expand(octaves, fields, height, width)
    y = (rows * scales + offsets[:, :, 1]).float().expand(octaves, fields, height, width)
    z = offsets[:, :, 2].float().expand(octaves, fields, height, width)
    x, y, z = (c.reshape(layers, height, width) for c in (x, y, z))
    # Cache blocking, not a per-sample loop: each block is a vectorised batch of whole layers sized so that the
    # ~20 temporaries of one pass stay in cache; on CPU that is several times faster than one huge pass.
    step = max(1, CHUNK_ELEMENTS // (height * width)) if work.type == "cpu" else layers
    layers_noise = torch.cat(
        [_simplex3(x[a : a + step], y[a : a + step], z[a : a + step], tables, a) for a in range(0, layers, step)]
    ).view(octaves, fields, height, width)

    amplitudes = persistence ** torch.arange(octaves, device=work, dtype=torch.float32)
    total = torch.einsum("o,ofhw->fhw", amplitudes, layers_noise)
    std, mean = torch.std_mean(total, dim=(1, 2), keepdim=True)
    total = (total - mean) / (std + STD_EPS)
    return total.view(batch, channels, height, width).to(device=out_device, dtype=dtype)


class _Tables:
    """Flat per-layer lattice hash tables: one integer index addresses (layer, entry) with a single gather.

    ``perm`` holds each layer's permutation twice (so ``p + j`` with p, j < 256 needs no wrap) with the layer's
    own base offset already added to every value; that folds the per-layer offset into the chained lookups.
    """

    def __init__(self, perm: Tensor, gradients: Tensor, base: Tensor) -> None:
        self.perm = perm  # (layers · 2·TABLE,) int32: base + permutation value
        self.gradients = gradients  # (layers · 2·TABLE, 3) float32 gradient of each hashed entry, indexed like perm
        self.base = base  # (layers, 1, 1) int32 offset of each layer's table
        self.radius2 = torch.tensor(FALLOFF_RADIUS2, dtype=torch.float32, device=perm.device)

    @classmethod
    def build(cls, perm: Tensor, octaves: int) -> _Tables:
        """Tables for ``octaves`` layers per field; a field's octaves share its permutation (offsets differ)."""
        fields = perm.shape[0]
        device = perm.device
        layers = octaves * fields
        doubled = torch.cat([perm, perm], dim=1).repeat(octaves, 1)  # (layers, 512)
        base = torch.arange(layers, device=device, dtype=torch.int32).view(layers, 1) * (2 * TABLE)
        gradients = torch.tensor(GRADIENTS, dtype=torch.float32, device=device)
        chosen = gradients[(doubled % len(GRADIENTS)).long()]  # (layers, 512, 3)
        return cls(
            perm=(doubled + base).reshape(-1),
            gradients=chosen.reshape(-1, 3),
            base=base.view(layers, 1, 1),
        )


def _simplex3(x: Tensor, y: Tensor, z: Tensor, tables: _Tables, first: int) -> Tensor:
    """Raw 3D simplex noise (about [-1, 1]) at points (layers, H, W) of layers ``first``.., each with its own table."""
    skew = (x + y).add_(z).mul_(SKEW)
    i = torch.floor(x + skew)
    j = torch.floor(y + skew)
    k = torch.floor(skew.add_(z))
    unskew = (i + j).add_(k).mul_(UNSKEW)
    x0 = (x - i).add_(unskew)  # offsets from the cell's origin corner, in unskewed space
    y0 = (y - j).add_(unskew)
    z0 = (z - k).add_(unskew)

    # The enclosing tetrahedron follows the rank order of (x0, y0, z0): the second corner steps along the largest
    # coordinate, the third along the two largest, the fourth along all three.
    xy = x0 >= y0
    yz = y0 >= z0
    xz = x0 >= z0
    first_x = xy & xz
    first_y = ~xy & yz
    second = (
        (first_x, first_y, ~(first_x | first_y)),
        (xy | xz, ~xy | yz, ~(yz & xz)),
    )

    ii = i.to(torch.int32).bitwise_and_(TABLE - 1)
    jj = j.to(torch.int32).bitwise_and_(TABLE - 1)
    kk = k.to(torch.int32).bitwise_and_(TABLE - 1).add_(tables.base[first : first + x.shape[0]])
    total = _corner(x0, y0, z0, ii, jj, kk, tables)
    for n, (si, sj, sk) in enumerate(second, start=1):
        fi, fj, fk = si.to(x0.dtype), sj.to(x0.dtype), sk.to(x0.dtype)
        shift = n * UNSKEW
        total += _corner(
            (x0 - fi).add_(shift),
            (y0 - fj).add_(shift),
            (z0 - fk).add_(shift),
            ii + si,
            jj + sj,
            kk + sk,
            tables,
        )
    last = 3 * UNSKEW - 1
    total += _corner(x0 + last, y0 + last, z0 + last, ii + 1, jj + 1, kk + 1, tables)
    return total.mul_(32.0)  # Gustavson's scale to about [-1, 1]; irrelevant after standardisation


def _corner(dx: Tensor, dy: Tensor, dz: Tensor, ci: Tensor, cj: Tensor, ck: Tensor, tables: _Tables) -> Tensor:
    """One tetrahedron corner's contribution: (0.5 - r^2)_+^4 times its hashed gradient dotted with the offset."""
    entry = _lookup(tables.perm, ck)  # perm values carry the layer base, so every index stays in its layer
    entry = _lookup(tables.perm, entry.add_(cj)).add_(ci)
    gradient = tables.gradients.index_select(0, entry.reshape(-1)).view(*entry.shape, 3)
    falloff = torch.addcmul(tables.radius2, dx, dx, value=-1.0).addcmul_(dy, dy, value=-1.0)
    falloff = falloff.addcmul_(dz, dz, value=-1.0).clamp_(min=0.0)
    falloff = falloff.mul_(falloff)
    falloff = falloff.mul_(falloff)
    dot = (gradient[..., 0] * dx).addcmul_(gradient[..., 1], dy).addcmul_(gradient[..., 2], dz)
    return falloff.mul_(dot)


def _lookup(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` through index_select on the flattened index: several times faster than advanced indexing."""
    return table.index_select(0, index.reshape(-1)).view(index.shape)
