"""The preprocessing's brain mask on skull-on and skull-stripped input, against the ground-truth masks.

    .venv/bin/python tests/benchmarks/bench_brain_mask.py

Datasets such as BraTS and IXI (preprocessed) come skull-stripped; the brain-mask step was designed for a
head. Prints the Dice of ``Preprocessed.input_brain_mask`` with Colin27's and the ITK example head's own
masks, each with the skull on and stripped (Colin27's ``ch2bet``; the ITK head times its mask).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.atlas import load_mni152_atlas  # noqa: E402
from models.preprocessing import Preprocessor  # noqa: E402
from tests import brains  # noqa: E402


def dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = sitk.GetArrayFromImage(a) > 0, sitk.GetArrayFromImage(b) > 0
    return float(2 * np.count_nonzero(x & y) / (np.count_nonzero(x) + np.count_nonzero(y)))


def main() -> int:
    preprocessor = Preprocessor(load_mni152_atlas())
    head, head_mask = brains.itk_head(), brains.itk_head_brain_mask()
    on_head = sitk.Resample(head_mask, head, sitk.Transform(), sitk.sitkNearestNeighbor) > 0
    cases = {
        "Colin27, skull on": (brains.colin27(skull=True), brains.colin27_brain_mask()),
        "Colin27, skull-stripped": (brains.colin27(skull=False), brains.colin27_brain_mask()),
        "ITK head, skull on": (head, head_mask),
        "ITK head, skull-stripped": (head * sitk.Cast(on_head, head.GetPixelID()), head_mask),
    }
    for name, (image, truth) in cases.items():
        prepared = preprocessor(image)
        truth_on_image = sitk.Resample(truth, image, sitk.Transform(), sitk.sitkNearestNeighbor)
        print(f"{name:<26} brain-mask Dice {dice(prepared.input_brain_mask, truth_on_image):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
