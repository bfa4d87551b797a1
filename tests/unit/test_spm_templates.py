"""SPM's templates as training data (models/data/spm_templates.py), read from the installed spm-runtime (`make spm`).

Skipped without the package on a developer machine; CI installs it (``.ci/run``: ``make spm``) and, with
UAD_REQUIRE_PEERS=1, a missing archive fails instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from models.data import spm_templates
from tests.peers import require_file


@pytest.fixture(scope="module")
def archive() -> Path:
    found = spm_templates.spm_archive()
    return require_file(found if found is not None else Path("spm_runtime/_spm/_spm.ctf"), "make spm")


def test_the_templates_are_whole_heads_in_mni_space(archive: Path) -> None:
    for image in spm_templates.SPM_IMAGES:
        volume = spm_templates.read_image(archive, image.member)
        assert volume.GetSize() == (91, 109, 91) and volume.GetSpacing() == (2.0, 2.0, 2.0), image.name
        # MNI's origin: voxel (45, 63, 36) is the anterior commissure at (0, 0, 0)
        assert np.allclose(volume.TransformIndexToPhysicalPoint((45, 63, 36)), (0.0, 0.0, 0.0)), image.name


def test_the_t2_is_a_t2_and_the_t1_a_t1(archive: Path) -> None:
    """CSF is darker than white matter on T1 and brighter on T2 (tissue from SPM's own probability maps)."""
    maps = spm_templates.tissue_maps(archive)
    for member, csf_over_wm in (("canonical/avg152T1.nii", (0.1, 0.6)), ("canonical/avg152T2.nii", (1.3, 5.0))):
        image = spm_templates.read_image(archive, member)
        values = sitk.GetArrayFromImage(image)
        on_grid = {k: sitk.GetArrayFromImage(sitk.Resample(maps[k], image)) for k in ("csf", "wm")}
        csf, white = (float(values[on_grid[k] > 0.9].mean()) for k in ("csf", "wm"))
        assert csf_over_wm[0] < csf / white < csf_over_wm[1], (member, csf, white)


def test_tissue_maps_are_probabilities(archive: Path) -> None:
    maps = spm_templates.tissue_maps(archive)
    arrays = {name: sitk.GetArrayFromImage(image) for name, image in maps.items()}
    total = arrays["gm"] + arrays["wm"] + arrays["csf"]
    assert all(0.0 <= a.min() and a.max() <= 1.0 for a in arrays.values())
    assert total.max() <= 1.0 + 1e-3
    brain_ml = float((total > 0.5).sum()) * 1.5**3 / 1000
    assert 1200 < brain_ml < 2000  # an adult intracranial volume, in mL


def test_colin27_and_the_non_commercial_labels_are_never_read(archive: Path) -> None:
    for member in spm_templates.EXCLUDED:
        with pytest.raises(ValueError, match="never used"):
            spm_templates.read_image(archive, member)


def test_the_fingerprint_follows_the_member(archive: Path) -> None:
    first = spm_templates.fingerprint(archive, "canonical/avg152T1.nii")
    assert first == spm_templates.fingerprint(archive, "canonical/avg152T1.nii")
    assert first != spm_templates.fingerprint(archive, "canonical/avg152T2.nii")
