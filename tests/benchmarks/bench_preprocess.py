"""Preprocessing benchmark: seconds per stage for real skull-on heads read from DICOM.

Two series, both written as MR DICOM files (fake patient) and read back the way the node reads them:

- Colin27 with skull resampled to 256x256x150 at 0.9x0.9x1.2 mm, axial tilted 12 degrees (oblique),
  the size of a typical clinical 3D T1;
- the ITK example head as it is: 128x128x62 at 2x2x3 mm, coronal.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_preprocess.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.uid import generate_uid

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # the offline brains and DICOM helpers live in tests/

from models.atlas import load_mni152_atlas  # noqa: E402
from models.preprocessing import Preprocessor  # noqa: E402
from node.volume.assemble import series_to_volume  # noqa: E402
from tests import brains  # noqa: E402
from tests.mr_files import mr_slice, write_series  # noqa: E402

STAGES = ("read", "reorient_resample", "bias_field", "registration", "brain_mask", "field_of_view", "model_grid")


@dataclass(frozen=True)
class Series:
    name: str
    paths: list[Path]


def clinical_colin27() -> sitk.Image:
    """Colin27 with skull on a 256x256x150 grid of 0.9x0.9x1.2 mm, tilted 12 degrees about left-right."""
    colin = brains.colin27(skull=True)
    tilt = sitk.VersorTransform((1.0, 0.0, 0.0), np.deg2rad(12.0))
    direction = np.array(tilt.GetMatrix()).reshape(3, 3)
    size = np.array([256, 256, 150])
    spacing = np.array([0.9, 0.9, 1.2])
    centre = np.array(colin.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in colin.GetSize()]))
    origin = centre - direction @ ((size - 1) * spacing / 2)
    return sitk.Resample(
        colin,
        [int(n) for n in size],
        sitk.Transform(),
        sitk.sitkLinear,
        tuple(origin),
        tuple(spacing),
        tuple(direction.ravel()),
        0.0,
        sitk.sitkFloat32,
    )


def write_dicom(image: sitk.Image, folder: Path) -> list[Path]:
    """``image`` as one MR series of unsigned 16-bit slices (one file per slice k)."""
    if image.GetSize()[0] != image.GetSize()[1]:
        raise ValueError("tests.mr_files writes square slices")
    pixels = sitk.GetArrayFromImage(image)
    scaled = np.clip(np.round(pixels * (4000.0 / max(float(pixels.max()), 1e-6))), 0, 4095).astype(np.uint16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    study, series = generate_uid(), generate_uid()
    datasets = []
    for k in range(image.GetSize()[2]):
        ds = mr_slice(study, series, k, size=image.GetSize()[0])
        ds.SeriesDescription = "BENCH T1"
        ds.ImagePositionPatient = list(image.TransformIndexToPhysicalPoint((0, 0, k)))
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [image.GetSpacing()[1], image.GetSpacing()[0]]  # between rows, between columns
        ds.SliceThickness = image.GetSpacing()[2]
        ds.PixelData = scaled[k].tobytes()
        datasets.append(ds)
    return write_series(datasets, folder)


def run_once(preprocess: Preprocessor, series: Series) -> dict[str, float]:
    start = time.perf_counter()
    image = series_to_volume(series.paths).image
    seconds = {"read": time.perf_counter() - start}
    seconds.update(preprocess(image).seconds)
    seconds["total"] = sum(seconds.values())
    return seconds


def format_table(rows: dict[str, list[dict[str, float]]]) -> str:
    columns = (*STAGES, "total")
    header = f"{'series':<34}" + "".join(f"{c:>19}" for c in columns)
    lines = [header, "-" * len(header)]
    for name, runs in rows.items():
        medians = [statistics.median(run[c] for run in runs) for c in columns]
        lines.append(f"{name:<34}" + "".join(f"{m:>19.2f}" for m in medians))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="Seconds per preprocessing stage for two skull-on heads.")
    parser.add_argument("--repeat", type=int, default=3, help="runs per series; the table shows the median")
    args = parser.parse_args()

    start = time.perf_counter()
    preprocess = Preprocessor(load_mni152_atlas())
    setup_s = time.perf_counter() - start

    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="uad-bench-preprocess-") as tmp:
        heads = {
            "Colin27 256x256x150 0.9x0.9x1.2 obl": clinical_colin27(),
            "ITK head 128x128x62 2x2x3 coronal": brains.itk_head(),
        }
        series = [Series(name, write_dicom(image, Path(tmp) / str(i))) for i, (name, image) in enumerate(heads.items())]
        for run in range(args.repeat):
            for s in series:
                seconds = run_once(preprocess, s)
                rows.setdefault(s.name, []).append(seconds)
                stages = ", ".join(f"{stage} {seconds[stage]:.2f}" for stage in STAGES)
                print(f"run {run + 1} {s.name}: {seconds['total']:.2f} s ({stages})", flush=True)

    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"SimpleITK {sitk.Version.VersionString()} with {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()} threads"
    )
    print(f"setup once per process (load the MNI152 atlas, derive its 2 mm copy and the crop box): {setup_s:.2f} s")
    print(f"seconds per stage, median of {args.repeat} run(s):")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
