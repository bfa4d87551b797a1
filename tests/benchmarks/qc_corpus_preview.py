"""Write every QC corpus case as DICOM and save a PNG of each, so a person can see that a case is what it claims.

Each series is read back the way the node reads it (``node.volume.series_to_volume``), reoriented to LPS
(SimpleITK ``DICOMOrient``) and resampled to 1 mm; the PNG shows the mid-axial slice (radiological view:
patient right on the left of the image, anterior at the top) and, beside it, the mid-sagittal slice
(anterior on the left, superior at the top), which shows what an axial slice cannot: a head-to-foot
flip, or a slab's position. Run from the repository root::

    .venv/bin/python tests/benchmarks/qc_corpus_preview.py OUT_FOLDER

DICOM goes to ``OUT_FOLDER/dicom/<case>/`` and the pictures to ``OUT_FOLDER/<case>.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # the corpus lives in tests/

from node.volume import series_to_volume  # noqa: E402
from tests.qc_corpus import QcCase, qc_cases, write_case  # noqa: E402

DISPLAY_SPACING_MM = 1.0
GAP_PIXELS = 8


def lps_isotropic(image: sitk.Image) -> sitk.Image:
    """``image`` with its axes permuted/flipped to the closest LPS order, resampled to 1 mm voxels."""
    oriented = sitk.DICOMOrient(image, "LPS")
    extent = np.multiply(oriented.GetSize(), oriented.GetSpacing())
    size = [max(1, round(float(mm) / DISPLAY_SPACING_MM)) for mm in extent]
    return sitk.Resample(
        oriented,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        oriented.GetOrigin(),
        (DISPLAY_SPACING_MM,) * 3,
        oriented.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )


def preview(image: sitk.Image) -> np.ndarray:
    """Mid-axial and mid-sagittal slices side by side, windowed to 0 .. 99.5th percentile, uint8."""
    voxels = sitk.GetArrayFromImage(lps_isotropic(image))  # (z I->S, y A->P, x R->L)
    axial = voxels[voxels.shape[0] // 2]  # rows A->P, columns R->L: radiological view
    sagittal = voxels[::-1, :, voxels.shape[2] // 2]  # rows S->I, columns A->P
    height = max(axial.shape[0], sagittal.shape[0])
    canvas = np.zeros((height, axial.shape[1] + GAP_PIXELS + sagittal.shape[1]), np.float32)
    canvas[: axial.shape[0], : axial.shape[1]] = axial
    canvas[: sagittal.shape[0], axial.shape[1] + GAP_PIXELS :] = sagittal
    high = float(np.percentile(voxels, 99.5)) or 1.0
    return np.clip(canvas / high * 255.0, 0, 255).astype(np.uint8)


def write_preview(case: QcCase, out: Path) -> str:
    """Write the case, read it back as the node does, save its PNG; a line saying what was written."""
    started = time.perf_counter()
    folder = write_case(case, out / "dicom")
    written = time.perf_counter() - started
    image = series_to_volume(sorted(folder.iterdir())).image
    sitk.WriteImage(sitk.GetImageFromArray(preview(image)), str(out / f"{case.name}.png"))
    direction = np.round(np.reshape(image.GetDirection(), (3, 3)), 3)
    size, spacing = image.GetSize(), tuple(round(s, 4) for s in image.GetSpacing())
    return (
        f"{case.name:28s} {case.expected:4s} {case.contrast:5s} size {size} spacing {spacing} "
        f"normal {tuple(direction[:, 2].tolist())} written in {written:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for the DICOM series and the PNGs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for case in qc_cases():
        print(write_preview(case, args.out), flush=True)


if __name__ == "__main__":
    main()
