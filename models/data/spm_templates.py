"""SPM's templates as optional offline training data, read from the PyPI package ``spm-runtime``.

``spm-runtime`` (GPL-2.0, SPM 25) ships SPM's data files inside ``spm_runtime/_spm/_spm.ctf``, an
ordinary zip archive. Nothing in it is executed here and nothing is copied into this project: the files
are read from the installed package when training, preprocessed like every other training volume and
cached on the model grid (``models/data/volumes.py``). Install it with ``make spm`` (or
``pip install 'uad-node[spm]'``); the node never needs it at run time.

What is used, and where it comes from (SPM's ``spm_templates.md``):

- ``canonical/avg152T1.nii``, ``avg152T2.nii``, ``avg152PD.nii``: ICBM averages of 152 brains in T1, T2
  and PD (Alan Evans, MNI, ICBM / NIH P-20), whole head, 2 mm. The T2 is the only real T2 image offline.
- ``canonical/avg305T1.nii``: the MNI305 average of 305 brains (Evans et al. 1993), T1, whole head, 2 mm.
- ``tpm/TPM.nii``: tissue probability maps (GM, WM, CSF, bone, soft tissue, air; 1.5 mm) from 549 IXI
  subjects (IXI data: CC BY-SA 3.0), the anatomy SPM's segmentation starts from.

Never used: ``canonical/single_subj_T1.nii`` is Colin27, the project's evaluation brain, and
``tpm/labels_Neuromorphometrics.nii`` is licensed for non-commercial use only.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

ARCHIVE_ROOT = "fsroot/_spm/cleaned/spm/"
ENVIRONMENT = "UAD_SPM_ARCHIVE"  # the path of an ``_spm.ctf``, overriding the installed package's
EXCLUDED = ("canonical/single_subj_T1.nii", "tpm/labels_Neuromorphometrics.nii")
TPM = "tpm/TPM.nii"
TPM_CLASSES = {"gm": 0, "wm": 1, "csf": 2}  # volume index in TPM.nii's fourth dimension


@dataclass(frozen=True)
class SpmImage:
    """One SPM template that is trained on: its name in the archive and the contrast it was acquired in."""

    name: str
    member: str
    contrast: str  # t1, t2 or pd (pd is not a model contrast: only its anatomy is used)


SPM_IMAGES = (
    SpmImage("spm_avg152T1", "canonical/avg152T1.nii", "t1"),
    SpmImage("spm_avg305T1", "canonical/avg305T1.nii", "t1"),
    SpmImage("spm_avg152T2", "canonical/avg152T2.nii", "t2"),
    SpmImage("spm_avg152PD", "canonical/avg152PD.nii", "pd"),
)


def spm_archive() -> Path | None:
    """The SPM data archive: ``$UAD_SPM_ARCHIVE``, else the installed spm-runtime's; None when neither exists."""
    configured = os.environ.get(ENVIRONMENT)
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise FileNotFoundError(f"{ENVIRONMENT}={configured}: no such file")
        return path
    spec = importlib.util.find_spec("spm_runtime")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "_spm" / "_spm.ctf"
    return path if path.is_file() else None


def read_image(archive: Path, member: str) -> sitk.Image:
    """A NIfTI member of the archive as a SimpleITK image (float32, LPS, geometry as stored)."""
    if member in EXCLUDED:
        raise ValueError(f"{member} is never used (see models/data/spm_templates.py)")
    data = _member_bytes(archive, member)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(member).name
        path.write_bytes(data)
        image = sitk.ReadImage(str(path))
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def tissue_maps(archive: Path) -> dict[str, sitk.Image]:
    """SPM's GM, WM and CSF probability maps (MNI space, 1.5 mm) as 3D images keyed gm, wm, csf."""
    stack = read_image(archive, TPM)
    size = list(stack.GetSize())
    maps = {}
    for name, index in TPM_CLASSES.items():
        maps[name] = sitk.Extract(stack, [*size[:3], 0], [0, 0, 0, index])
    return maps


def fingerprint(archive: Path, member: str) -> bytes:
    """What a cached volume made from ``member`` depends on: the member's CRC and size, as the zip records them."""
    with zipfile.ZipFile(archive) as bundle:
        info = bundle.getinfo(_member_path(archive, bundle, member))
    return f"spm:{member}:{info.CRC:08x}:{info.file_size}".encode()


def _member_bytes(archive: Path, member: str) -> bytes:
    with zipfile.ZipFile(archive) as bundle:
        return bundle.read(_member_path(archive, bundle, member))


def _member_path(archive: Path, bundle: zipfile.ZipFile, member: str) -> str:
    name = ARCHIVE_ROOT + member
    if name in bundle.namelist():
        return name
    raise FileNotFoundError(f"{archive}: no {member} in this SPM archive")
