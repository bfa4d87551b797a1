"""The real brains that exist offline, as SimpleITK images (LPS, physical geometry intact).

- MNI152 2009 T1 template (skull-stripped, 1 mm) and its brain mask, from nilearn (PyPI).
- Colin27 with skull (``ch2``) and skull-stripped (``ch2bet``), from Debian ``mricron-data``.
  Colin27 is the project's evaluation brain: never train on it, never use it as the atlas.
- A T1 head with skull, 2x2x3 mm, and its skull-stripped version, from Debian
  ``insighttoolkit5-examples``.

Missing Debian data skip their tests, and fail them under UAD_REQUIRE_PEERS=1 (CI installs them).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import SimpleITK as sitk

from tests.peers import require_file

MRICRON = Path("/usr/share/mricron/templates")
ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")


@functools.cache
def _nilearn_image(loader_name: str) -> sitk.Image:
    """nilearn hands out nibabel images (RAS); a NIfTI round trip lets ITK convert them to LPS."""
    from nilearn import datasets

    image = getattr(datasets, loader_name)(resolution=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.nii.gz"
        image.to_filename(path)
        return sitk.ReadImage(str(path))


def mni152_t1() -> sitk.Image:
    """The MNI152 2009 T1 template, skull-stripped, float32, 197x233x189 at 1 mm."""
    return sitk.Cast(_nilearn_image("load_mni152_template"), sitk.sitkFloat32)


def mni152_brain_mask() -> sitk.Image:
    return sitk.Cast(_nilearn_image("load_mni152_brain_mask") > 0, sitk.sitkUInt8)


def _debian_image(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(require_file(path)))


def colin27(skull: bool = True) -> sitk.Image:
    """Colin27 T1, 181x217x181 at 1 mm, with skull (``ch2``) or without (``ch2bet``)."""
    return sitk.Cast(_debian_image(MRICRON / ("ch2.nii.gz" if skull else "ch2bet.nii.gz")), sitk.sitkFloat32)


def colin27_brain_mask() -> sitk.Image:
    return sitk.Cast(_debian_image(MRICRON / "ch2bet.nii.gz") > 0, sitk.sitkUInt8)


def itk_head() -> sitk.Image:
    """A second subject's T1 head with skull, 128x128x62 at 2x2x3 mm."""
    return sitk.Cast(_debian_image(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"), sitk.sitkFloat32)


def itk_head_brain_mask() -> sitk.Image:
    return sitk.Cast(_debian_image(ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz") > 0, sitk.sitkUInt8)
