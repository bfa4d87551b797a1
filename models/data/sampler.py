"""Batches of axial slices for training, as a pure function of (seed, step): training resumes exactly.

Augmenting a whole volume (~0.06 s) for every slice would dominate a CPU training step, so a pool
of ``pool_size`` augmented volumes is kept and each slot is rebuilt every ``refresh_every`` steps.
What slot k holds at step s is decided only by (seed, its refresh epoch, k), and the slices of a
batch only by (seed, step): a sampler built fresh at step s gives the batch an uninterrupted one
would have. Slots refresh at staggered steps (slot k at offset k·refresh_every/pool_size), so the
cost is spread evenly instead of stalling one step in every ``refresh_every``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from models.data.augment import AugmentConfig, augment_volume
from models.data.synthesis import CONTRASTS
from models.data.volumes import TrainingVolume

_TRAINING = "training"
_VALIDATION = "validation"


@dataclass(frozen=True)
class PooledVolume:
    """One augmented volume in the pool and the slices that hold enough brain to train on."""

    image: Tensor  # (D, H, W) float32 in [0, 1]
    usable_slices: Tensor  # int64 indices into D


class SliceSampler:
    """Slices from a pool of augmented volumes; ``batch(step)`` depends only on (seed, step, batch size).

    ``augment=None`` trains on the volumes acquired in ``contrast`` as they are (others are only painted).
    Validation batches use their own seed stream ("validation" instead of "training" in every derived
    seed), so they are built from augmented volumes no training step sees (with ``augment=None``, from
    the same real volumes, the only ones there are), and do not change as training goes on.
    """

    def __init__(
        self,
        volumes: list[TrainingVolume],
        augment: AugmentConfig | None,
        seed: int,
        contrast: str = "t1",
        pool_size: int = 8,
        refresh_every: int = 25,
        min_brain_fraction: float = 0.1,
    ) -> None:
        if not volumes:
            raise ValueError("no training volumes")
        if contrast not in CONTRASTS:
            raise ValueError(f"unknown contrast {contrast!r}; expected one of {', '.join(CONTRASTS)}")
        if augment is None:  # only the images acquired in the contrast, as they are
            volumes = [volume for volume in volumes if volume.contrast == contrast]
            if not volumes:
                raise ValueError(f"no {contrast} images to train on without augmentation (it synthesises them)")
        if pool_size < 1 or refresh_every < 1:
            raise ValueError(f"pool_size and refresh_every must be >= 1, got {pool_size} and {refresh_every}")
        self._volumes = volumes
        self._augment = augment
        self._seed = seed
        self._contrast = contrast
        self._pool_size = pool_size
        self._refresh_every = refresh_every
        self._min_brain_fraction = min_brain_fraction
        self._pool: dict[tuple[int, int], PooledVolume] = {}  # (epoch, slot) -> volume; only the current ones

    def batch(self, step: int, batch_size: int) -> Tensor:
        """(batch_size, 1, H, W) float32 in [0, 1]: slices drawn from the pool as it stands at ``step``."""
        if step < 0 or batch_size < 1:
            raise ValueError(f"step must be >= 0 and batch_size >= 1, got {step} and {batch_size}")
        keys = [(self._epoch(step, slot), slot) for slot in range(self._pool_size)]
        self._pool = {key: self._pool[key] if key in self._pool else self._pooled(_TRAINING, *key) for key in keys}
        pool = [self._pool[key] for key in keys]
        return _draw(pool, batch_size, _generator(self._seed, _TRAINING, "step", step))

    def validation_batches(self, count: int, batch_size: int) -> list[Tensor]:
        """``count`` batches, the same for every call with the same seed, whatever the training step."""
        pool = [self._pooled(_VALIDATION, 0, slot) for slot in range(self._pool_size)]
        generator = _generator(self._seed, _VALIDATION, "slices")
        return [_draw(pool, batch_size, generator) for _ in range(count)]

    def _epoch(self, step: int, slot: int) -> int:
        """Which refresh of ``slot`` is current at ``step``: slot k turns over at offset k·R/pool_size."""
        offset = slot * self._refresh_every // self._pool_size
        return (step + offset) // self._refresh_every

    def _pooled(self, stream: str, epoch: int, slot: int) -> PooledVolume:
        generator = _generator(self._seed, stream, "volume", epoch, slot)
        source = self._volumes[int(torch.randint(len(self._volumes), (), generator=generator))]
        if self._augment is None:
            image, mask = torch.from_numpy(source.volume), torch.from_numpy(source.brain_mask)
        else:
            image, mask = augment_volume(source, self._augment, generator, self._contrast)
        fraction = mask.float().mean(dim=(1, 2))
        usable = torch.nonzero(fraction >= self._min_brain_fraction).flatten()
        if usable.numel() == 0:
            usable = fraction.argmax().reshape(1)  # never an empty choice; the fullest slice instead
        return PooledVolume(image=image.float(), usable_slices=usable)


def _draw(pool: list[PooledVolume], batch_size: int, generator: torch.Generator) -> Tensor:
    """Each slice from a random pool volume and a random usable slice of it."""
    slots = torch.randint(len(pool), (batch_size,), generator=generator)
    picks = torch.rand(batch_size, generator=generator)
    slices = []
    for slot, pick in zip(slots.tolist(), picks.tolist(), strict=True):
        usable = pool[slot].usable_slices
        index = int(usable[min(int(pick * usable.numel()), usable.numel() - 1)])
        slices.append(pool[slot].image[index])
    return torch.stack(slices)[:, None].contiguous()


def _generator(seed: int, *parts: object) -> torch.Generator:
    """A generator seeded from ``seed`` and ``parts`` by a hash: streams that never overlap by accident."""
    text = ":".join(str(part) for part in (seed, *parts))
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator().manual_seed(value)
