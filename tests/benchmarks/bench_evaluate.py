"""Evaluation on a dataset folder against the built-in evaluation, and its throughput.

    .venv/bin/python tests/benchmarks/bench_evaluate.py [--checkpoint CKPT] [--threads N] [--validation 10 --test 20]

The built-in simulated set (Colin27 on the model grid with simulated lesions, ``uad-node evaluate``) is
written as a ``pairs`` folder (images and labels on the model grid, in atlas space; the healthy cases in a
folder of their own) and evaluated again through ``uad-node evaluate --dataset``'s code at the built-in
run's threshold. Both runs score the same volumes with the same model; the dataset path preprocesses them
again (registration of an already registered volume) and measures on the images' own grid, so small
differences remain and are printed. Throughput is volumes per minute through the dataset path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.atlas import load_mni152_atlas  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.data.volumes import default_cache_dir  # noqa: E402
from models.detector import AnomalyDetector  # noqa: E402
from models.evaluation.cases import EvaluationCase  # noqa: E402
from models.evaluation.dataset_evaluation import Protocol, evaluate_dataset  # noqa: E402
from models.evaluation.harness import evaluate_method  # noqa: E402
from models.evaluation.run import EvaluationSize, checkpoint_evaluation_set  # noqa: E402
from models.preprocessing import Grid, Preprocessor  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "default-t1.pt"


def write_case(case: EvaluationCase, grid: Grid, folder: Path, name: str) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(grid.image(case.volume.astype(np.float32)), str(folder / "images" / f"{name}.nii.gz"))
    if case.lesion_mask is not None:
        (folder / "labels").mkdir(exist_ok=True)
        sitk.WriteImage(grid.image(case.lesion_mask.astype(np.uint8)), str(folder / "labels" / f"{name}.nii.gz"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--validation", type=int, default=10)
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--healthy", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    model = AnomalyDetector(checkpoint)
    size = EvaluationSize(validation=args.validation, test=args.test, healthy=args.healthy)
    evaluation = checkpoint_evaluation_set(checkpoint, size, default_cache_dir())

    started = time.perf_counter()
    builtin = evaluate_method("cDDPM", model.residual, evaluation)
    builtin_s = time.perf_counter() - started
    print(f"built-in: threshold {builtin.threshold:.4g}, {len(builtin.cases)} test cases, {builtin_s:.0f} s")

    preprocessor = Preprocessor(load_mni152_atlas(), contrast=checkpoint.contrast)
    with tempfile.TemporaryDirectory() as tmp:
        dataset, healthy = Path(tmp) / "pairs", Path(tmp) / "healthy" / "images"
        grid = preprocessor.geometry.model
        for index, case in enumerate(evaluation.test):
            write_case(case, grid, dataset, f"test-{index:02d}")
        for index, case in enumerate(evaluation.healthy):
            healthy.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(grid.image(case.volume.astype(np.float32)), str(healthy / f"healthy-{index:02d}.nii.gz"))
        result = evaluate_dataset(
            dataset,
            [("cDDPM", model.residual)],
            preprocessor,
            Protocol(threshold=builtin.threshold),
            checkpoint=str(args.checkpoint),
            layout="pairs",
            healthy=healthy.parent,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    figures = result.methods[0]
    mean = figures.mean
    print("| path | Dice | AUPRC | AUROC | healthy FP mL | volumes | seconds | volumes/min |")
    print("|---|---|---|---|---|---|---|---|")
    built = len(evaluation.validation) + len(evaluation.test) + len(evaluation.healthy)
    print(
        f"| built-in (model grid) | {100 * builtin.dice:.1f} | {100 * builtin.auprc:.1f} | {100 * builtin.auroc:.1f} "
        f"| {builtin.healthy_fp_ml:.1f} | {built} | {builtin_s:.0f} | {60 * built / builtin_s:.1f} |"
    )
    print(
        f"| --dataset pairs (own grid) | {100 * mean['dice']:.1f} | {100 * mean['auprc']:.1f} "
        f"| {100 * mean['auroc']:.1f} | {mean['healthy_fp_ml']:.1f} | {result.volumes} | {result.seconds:.0f} "
        f"| {60 * result.volumes / result.seconds:.1f} |"
    )
    differences = [abs(a.dice - b.dice) for a, b in zip(builtin.cases, figures.cases, strict=True)]
    print(f"per-case |Dice difference|: median {np.median(differences):.3f}, max {max(differences):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
