"""The registration atlas: the MNI ICBM152 2009 T1 template that nilearn ships (no download).

Not Colin27: that is the project's evaluation brain, and registering it to itself would make the
evaluation trivially easy. nilearn hands out nibabel images in RAS; they are converted in memory to
SimpleITK's LPS physical space so the atlas lives in the same coordinates as every DICOM volume.

The template is a T1. For T2 and FLAIR, templates of the same anatomy are painted from its grey and white
matter probabilities (``Atlas.template``): registration and the quality gate compare a series with the
anatomy in the contrast its model reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
CONTRASTS = ("t1", "t2", "flair")
# Tissue intensities (CSF, GM, WM) painted for the contrasts the template has no image of: the middle of the
# ranges the training data synthesis draws from (models.data.synthesis).
TEMPLATE_MEANS = {"t2": (0.92, 0.55, 0.33), "flair": (0.14, 0.90, 0.61)}


@dataclass(frozen=True)
class Atlas:
    """A skull-stripped T1 template, its brain mask and tissue probabilities on the same 1 mm grid."""

    image: sitk.Image  # float32, skull-stripped, intensities in [0, 1]
    brain_mask: sitk.Image  # uint8, 1 inside the brain
    grey_matter: sitk.Image  # float32 probability in [0, 1]
    white_matter: sitk.Image  # float32 probability in [0, 1]

    def template(self, contrast: str) -> sitk.Image:
        """The anatomy in ``contrast`` (t1, t2, flair): the T1 template itself, or painted from the tissue maps
        (CSF is the rest of the brain mask), float32, 0 outside the brain."""
        if contrast == "t1":
            return self.image
        if contrast not in TEMPLATE_MEANS:
            raise ValueError(f"unknown contrast {contrast!r}; expected one of {', '.join(CONTRASTS)}")
        csf_mean, gm_mean, wm_mean = TEMPLATE_MEANS[contrast]
        brain = sitk.Cast(self.brain_mask, sitk.sitkFloat32)
        grey, white = self.grey_matter * brain, self.white_matter * brain
        csf = sitk.Clamp(brain - grey - white, sitk.sitkFloat32, 0.0, 1.0)
        return csf * csf_mean + grey * gm_mean + white * wm_mean


def load_mni152_atlas() -> Atlas:
    """The MNI152 2009 template (197x233x189 at 1 mm) with nilearn's own brain mask (template > 0.2) and
    grey and white matter probability templates."""
    from nilearn import datasets  # slow to import; only the preprocessing needs it

    def load(loader: str) -> sitk.Image:
        return sitk.Cast(_to_sitk(getattr(datasets, loader)(resolution=1)), sitk.sitkFloat32)

    return Atlas(
        image=load("load_mni152_template"),
        brain_mask=sitk.Cast(load("load_mni152_brain_mask") > 0, sitk.sitkUInt8),
        grey_matter=load("load_mni152_gm_template"),
        white_matter=load("load_mni152_wm_template"),
    )


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
