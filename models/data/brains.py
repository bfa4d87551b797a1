"""The real brains that exist offline, as SimpleITK images (LPS, physical geometry intact).

- MNI152 2009 T1 template (skull-stripped, 1 mm), its brain mask and grey/white matter probability
  templates, from nilearn (PyPI).
- Colin27 with skull (``ch2``) and skull-stripped (``ch2bet``), from Debian ``mricron-data``.
  Colin27 is the project's evaluation brain: never train on it, never use it as the atlas.
- A second subject's T1 head with skull, 2x2x3 mm, its skull-stripped version and a k-means tissue
  labelling, from Debian ``insighttoolkit5-examples``.

Nothing here downloads; a missing Debian file raises FileNotFoundError naming the package.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import SimpleITK as sitk

MRICRON = Path("/usr/share/mricron/templates")
ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
COLIN27_HEAD = MRICRON / "ch2.nii.gz"
COLIN27_BRAIN = MRICRON / "ch2bet.nii.gz"
ITK_HEAD = ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"
ITK_HEAD_BRAIN = ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz"
ITK_HEAD_LABELS = ITK_DATA / "KmeansTest_T1KmeansPrelimSegmentation.nii.gz"
DEBIAN_PACKAGES = {MRICRON: "mricron-data", ITK_DATA: "insighttoolkit5-examples"}


@functools.cache
def _nilearn_image(loader_name: str) -> sitk.Image:
    """nilearn hands out nibabel images (RAS); a NIfTI round trip lets ITK convert them to LPS."""
    from nilearn import datasets  # slow to import

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


def mni152_grey_matter() -> sitk.Image:
    """Grey matter probability in [0, 1] on the template's grid."""
    return sitk.Cast(_nilearn_image("load_mni152_gm_template"), sitk.sitkFloat32)


def mni152_white_matter() -> sitk.Image:
    """White matter probability in [0, 1] on the template's grid."""
    return sitk.Cast(_nilearn_image("load_mni152_wm_template"), sitk.sitkFloat32)


def debian_file(path: Path) -> Path:
    """``path`` if it exists, else FileNotFoundError saying which package to install."""
    if not path.is_file():
        package = DEBIAN_PACKAGES.get(path.parent, "the Debian data packages")
        raise FileNotFoundError(f"{path} is missing (apt-get install {package})")
    return path


def _debian_image(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(debian_file(path)))


def colin27(skull: bool = True) -> sitk.Image:
    """Colin27 T1, 181x217x181 at 1 mm, with skull (``ch2``) or without (``ch2bet``)."""
    return sitk.Cast(_debian_image(COLIN27_HEAD if skull else COLIN27_BRAIN), sitk.sitkFloat32)


def colin27_brain_mask() -> sitk.Image:
    return sitk.Cast(_debian_image(COLIN27_BRAIN) > 0, sitk.sitkUInt8)


def itk_head() -> sitk.Image:
    """A second subject's T1 head with skull, 128x128x62 at 2x2x3 mm."""
    return sitk.Cast(_debian_image(ITK_HEAD), sitk.sitkFloat32)


def itk_head_brain_mask() -> sitk.Image:
    return sitk.Cast(_debian_image(ITK_HEAD_BRAIN) > 0, sitk.sitkUInt8)


def itk_head_labels() -> sitk.Image:
    """ITK's k-means labelling of the head (integer classes ordered by intensity), on the head's grid."""
    return _debian_image(ITK_HEAD_LABELS)
