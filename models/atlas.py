"""The registration atlas: the MNI ICBM152 2009 T1 template that nilearn ships (no download).

Not Colin27: that is the project's evaluation brain, and registering it to itself would make the
evaluation trivially easy. nilearn hands out nibabel images in RAS; they are converted in memory to
SimpleITK's LPS physical space so the atlas lives in the same coordinates as every DICOM volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Atlas:
    """A skull-stripped T1 template and its brain mask on the same 1 mm grid."""

    image: sitk.Image  # float32, skull-stripped, intensities in [0, 1]
    brain_mask: sitk.Image  # uint8, 1 inside the brain


def load_mni152_atlas() -> Atlas:
    """The MNI152 2009 template (197x233x189 at 1 mm) with nilearn's own brain mask (template > 0.2)."""
    from nilearn import datasets  # slow to import; only the preprocessing needs it

    image = _to_sitk(datasets.load_mni152_template(resolution=1))
    mask = _to_sitk(datasets.load_mni152_brain_mask(resolution=1))
    return Atlas(image=sitk.Cast(image, sitk.sitkFloat32), brain_mask=sitk.Cast(mask > 0, sitk.sitkUInt8))


def _to_sitk(nifti: object) -> sitk.Image:
    """A nibabel 3D image as a SimpleITK image with the same physical geometry, in LPS."""
    data = np.asarray(nifti.get_fdata(dtype=np.float32))  # type: ignore[attr-defined]
    affine = np.asarray(nifti.affine, dtype=float)  # type: ignore[attr-defined]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))  # (x, y, z) -> (z, y, x)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (_RAS_TO_LPS @ affine[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in _RAS_TO_LPS @ affine[:3, 3]))
    return image
