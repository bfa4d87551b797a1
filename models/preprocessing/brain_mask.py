"""The brain mask in the subject's own space, for a head with its skull on.

The atlas brain mask, carried back through the affine registration, is already close; what it
misses is the subject's own brain outline, which an affine cannot follow. The outer BAND_MM of the
carried mask is then trimmed by intensity: voxels there darker than DARK_FRACTION of the brain's
median intensity are bone, air, or (T1, FLAIR) CSF; brain tissue is brighter than that in T1, T2
and FLAIR alike.

Measured Dice against the ground-truth masks (carried -> trimmed): Colin27 0.948 -> 0.966, the ITK
example head 0.933 -> 0.939, a T2-like remapping of Colin27 0.953 -> 0.953. Also letting the band
*grow* the mask by intensity (bright voxels up to 3 mm outside) gave 0.959 / 0.955 but pulled bright
CSF and scalp into the T2-like mask (0.939), so the mask is only ever trimmed. Fractions 0.4-0.6 and
bands 2-4 mm moved these by at most 0.01.

Only the rim changes, so a dark lesion deep in the brain never leaves the mask, and any hole left
behind is filled. A dark lesion at the brain surface (a cortical stroke cavity on T1) can lose up to
BAND_MM of its outer edge.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from models.preprocessing.grid import Grid, resample

BAND_MM = 3
DARK_FRACTION = 0.5
OPENING_MM = 1  # cuts thin bright strands (vessels, dura) off the brain
CLOSING_MM = 2  # smooths the outline over sulci the threshold opened


def carried_brain_mask(atlas_mask: sitk.Image, atlas_to_subject: sitk.Transform, grid: Grid) -> sitk.Image:
    """The atlas brain mask on the subject's ``grid`` (uint8): partial volumes of at least one half."""
    fraction = resample(sitk.Cast(atlas_mask, sitk.sitkFloat32), grid, atlas_to_subject.GetInverse(), "linear")
    return sitk.Cast(fraction >= 0.5, sitk.sitkUInt8)


def refine_brain_mask(image: sitk.Image, carried: sitk.Image) -> sitk.Image:
    """``carried`` (uint8, on the grid of ``image``, 1 mm) with its dark outer rim trimmed off.

    Works on the bounding box of the mask only: the field of view of a head scan is mostly not brain.
    """
    if image.GetSpacing() != (1.0, 1.0, 1.0):
        raise ValueError("the refinement radii are in voxels of a 1 mm image")
    margin = CLOSING_MM + 1
    box = _bounding_box(carried, margin)
    if box is None:
        return carried
    start, size = box
    roi = sitk.RegionOfInterest(image, size, start)
    mask = sitk.RegionOfInterest(carried, size, start)

    inner = sitk.BinaryErode(mask, [BAND_MM] * 3, sitk.sitkBall)
    inner_values = sitk.GetArrayViewFromImage(roi)[sitk.GetArrayViewFromImage(inner) > 0]
    if inner_values.size == 0:
        return carried
    bright = roi > DARK_FRACTION * float(np.median(inner_values))
    refined = sitk.Or(sitk.And(mask, bright), inner)
    refined = sitk.BinaryMorphologicalOpening(refined, [OPENING_MM] * 3, sitk.sitkBall)
    refined = sitk.Cast(
        sitk.RelabelComponent(sitk.ConnectedComponent(refined), sortByObjectSize=True) == 1, sitk.sitkUInt8
    )
    refined = sitk.BinaryMorphologicalClosing(refined, [CLOSING_MM] * 3, sitk.sitkBall)
    refined = sitk.BinaryFillhole(refined)

    whole = sitk.Image(carried.GetSize(), sitk.sitkUInt8)
    whole.CopyInformation(carried)
    return sitk.Paste(whole, sitk.Cast(refined, sitk.sitkUInt8), size, [0, 0, 0], start)


def _bounding_box(mask: sitk.Image, margin: int) -> tuple[list[int], list[int]] | None:
    """Start index and size of the mask's bounding box grown by ``margin`` voxels, clipped to the image."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if not stats.HasLabel(1):
        return None
    box = stats.GetBoundingBox(1)
    start = [max(box[i] - margin, 0) for i in range(3)]
    stop = [min(box[i] + box[i + 3] + margin, mask.GetSize()[i]) for i in range(3)]
    return start, [b - a for a, b in zip(start, stop, strict=True)]
