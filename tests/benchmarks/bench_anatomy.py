"""How much anatomy the synthetic-subject generator adds, and what it costs per volume.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_anatomy.py [--samples 32] [--figure PATH]

From each offline training brain's tissue maps, N training samples are drawn twice: with the
augmentation alone (affine + elastic, what the first model trained on) and with the new anatomies of
models/data/anatomy.py on top. For each set it prints the spread (coefficient of variation) of the
ventricle volume (CSF deep in the brain) and of the cortical grey matter volume, the mean pairwise
Dice of the ventricles (lower: more varied shapes), and the seconds per sample (one thread). With
``--figure`` it writes a montage of mid-axial slices of T1-, T2- and FLAIR-like samples and of the real
brains (for the model card).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.data.anatomy import VENTRICLE_DEPTH_VOX, _depth, random_anatomy  # noqa: E402
from models.data.augment import (  # noqa: E402
    AugmentConfig,
    _warp,
    augment_volume,  # noqa: E402
)
from models.data.volumes import TrainingVolume, default_cache_dir, healthy_volumes  # noqa: E402

VOXEL_ML = 0.008


def ventricles(tissue: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    return ((tissue[0] > 0.5) & (_depth(mask) >= VENTRICLE_DEPTH_VOX)).numpy()


def cortex_ml(tissue: torch.Tensor, mask: torch.Tensor) -> float:
    return float((tissue[1] * mask).sum()) * VOXEL_ML


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))


def sample_anatomies(
    volumes: list[TrainingVolume], count: int, new_anatomy: bool
) -> tuple[list[np.ndarray], list[float], float]:
    """Ventricle masks, cortex volumes and mean seconds per sample (the warp, plus the new anatomy if asked)."""
    config = AugmentConfig()
    masks, cortices, seconds = [], [], []
    for index in range(count):
        volume = volumes[index % len(volumes)]
        generator = torch.Generator().manual_seed(index)
        started = time.perf_counter()
        _, mask, tissue = _warp(volume, config, generator)
        assert tissue is not None
        if new_anatomy:
            tissue, mask = random_anatomy(tissue, mask, config.anatomy, generator)
        seconds.append(time.perf_counter() - started)
        masks.append(ventricles(tissue, mask))
        cortices.append(cortex_ml(tissue, mask))
    return masks, cortices, statistics.median(seconds)


def figure(volumes: list[TrainingVolume], path: Path) -> None:
    from PIL import Image

    config = dataclasses.replace(AugmentConfig(), synthetic_probability=1.0, anatomy_probability=1.0)
    rows = []
    for contrast in ("t1", "t2", "flair"):
        tiles = []
        for index in range(8):
            image, _ = augment_volume(volumes[0], config, torch.Generator().manual_seed(100 + index), contrast)
            tiles.append(image.numpy()[27])
        rows.append(np.concatenate(tiles, axis=1))
    real = [v.volume[27] for v in volumes][:8]
    real += [np.zeros_like(real[0])] * (8 - len(real))
    rows.append(np.concatenate(real, axis=1))
    # Rows: T1, T2, FLAIR samples, then the real brains. LPS array rows run anterior to posterior and columns
    # right to left, so the plain array is the radiological view (anterior up, patient's right on the left).
    montage = np.concatenate(rows, axis=0)
    pixels = (np.clip(montage, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, optimize=True)
    print(f"figure: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    volumes = [v for v in healthy_volumes("offline", default_cache_dir()) if v.tissue is not None]
    print(f"{len(volumes)} training brains with tissue maps: {', '.join(v.name for v in volumes)}")
    print(
        f"{'samples':<34} {'ventricles mL':>16} {'CV':>6} {'cortex mL CV':>13} {'ventricle Dice':>15} {'s/sample':>9}"
    )
    for label, new_anatomy in (("augmentation only (affine+elastic)", False), ("with new anatomies", True)):
        masks, cortices, seconds = sample_anatomies(volumes, args.samples, new_anatomy)
        sizes = [float(m.sum()) * VOXEL_ML for m in masks]
        overlap = statistics.mean(dice(a, b) for a, b in combinations(masks, 2))
        spread = statistics.pstdev(sizes) / statistics.mean(sizes)
        cortex_spread = statistics.pstdev(cortices) / statistics.mean(cortices)
        summary = f"{statistics.mean(sizes):6.1f} ± {statistics.pstdev(sizes):5.1f}"
        print(f"{label:<34} {summary:>16} {spread:6.2f} {cortex_spread:13.3f} {overlap:15.3f} {seconds:9.3f}")
    if args.figure:
        figure(volumes, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
