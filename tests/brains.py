"""The offline brains for tests (``models.data.brains``), skipping when a Debian data package is absent.

Missing Debian data skip their tests, and fail them under UAD_REQUIRE_PEERS=1 (CI installs them).
Colin27 is the project's evaluation brain: never train on it, never use it as the atlas.
"""

from __future__ import annotations

import SimpleITK as sitk

from models.data import brains
from models.data.brains import mni152_brain_mask, mni152_t1
from tests.peers import require_file

__all__ = ["colin27", "colin27_brain_mask", "itk_head", "itk_head_brain_mask", "mni152_brain_mask", "mni152_t1"]


def colin27(skull: bool = True) -> sitk.Image:
    require_file(brains.COLIN27_HEAD if skull else brains.COLIN27_BRAIN)
    return brains.colin27(skull)


def colin27_brain_mask() -> sitk.Image:
    require_file(brains.COLIN27_BRAIN)
    return brains.colin27_brain_mask()


def itk_head() -> sitk.Image:
    require_file(brains.ITK_HEAD)
    return brains.itk_head()


def itk_head_brain_mask() -> sitk.Image:
    require_file(brains.ITK_HEAD_BRAIN)
    return brains.itk_head_brain_mask()
