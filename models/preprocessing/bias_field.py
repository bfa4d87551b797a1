"""N4 bias-field correction that takes seconds, not minutes.

The bias field is smooth (a cubic B-spline with a few control points), so it is estimated on the
image shrunk 4x (about 4 mm voxels) and then evaluated at every voxel of the full-resolution image.
"""

from __future__ import annotations

import SimpleITK as sitk

SHRINK_FACTOR = 4
# One entry per fitting level (the B-spline mesh doubles each level): N4's default of 4 x 50. A smooth
# synthetic field (+-25 %) put on Colin27 and the ITK head left 1.0-1.2 % residual (std of the log
# field over the brain) with four levels, 1.4-2.4 % with three, for ~0.8 s more.
ITERATIONS_PER_LEVEL = (50, 50, 50, 50)


def correct_bias_field(image: sitk.Image) -> sitk.Image:
    """``image`` (float32) divided by the N4 estimate of its multiplicative bias field.

    N4 fits where a head mask (Otsu on the shrunk image) says there is tissue: the background's noise
    would otherwise pull the fit, and N4 takes logarithms, so it needs positive intensities there.
    """
    shrunk = sitk.Shrink(image, [SHRINK_FACTOR] * 3)
    head = sitk.And(sitk.OtsuThreshold(shrunk, 0, 1), shrunk > 0)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(ITERATIONS_PER_LEVEL))
    n4.Execute(shrunk, head)
    return sitk.Cast(image / sitk.Exp(n4.GetLogBiasFieldAsImage(image)), sitk.sitkFloat32)
