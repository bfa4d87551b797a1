"""Healthy volumes to train on, preprocessed onto the model grid once and cached.

Training must see volumes exactly as inference does, so every source goes through the same
``Preprocessor``; that costs ~6 s a volume, so each result is kept as one ``.npz`` in a cache folder,
keyed by what it was made from (the file bytes, or the loader name for the offline brains), the
preprocessing version, the registration contrast and the model grid. A stale cache can therefore never
be picked up.

Tissue probabilities (CSF, GM, WM) come with each volume so augmentation can synthesise other
contrasts and new anatomies from it. For the MNI152 template and SPM's tissue probability maps they are
the maps themselves; for everything else they are a 3-class Gaussian mixture of the intensities inside
the brain, and the classes are named by their overlap with the MNI152 tissue templates on the model grid
(which is in atlas space) rather than by brightness, so a T2, PD or FLAIR scan gets the right labels too.

Each volume records the contrast its image was acquired in (None for SPM's tissue maps, which have no
image of their own): a model trains on the real images of its own contrast, and on images painted from
the tissue maps of all of them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from models.data import brains, spm_templates
from models.preprocessing import (
    PREPROCESSING_VERSION,
    ModelGeometry,
    PreprocessingError,
    Preprocessor,
    atlas_to_model_grid,
    to_model_grid,
)
from models.preprocessing.intensity import normalise

if TYPE_CHECKING:
    from models.atlas import Atlas

# Bump when the tissue maps or the cache layout change (the preprocessing has its own version).
CACHE_VERSION = "3"
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
TISSUE_CLASSES = ("csf", "gm", "wm")
# How much the atlas tissue priors are flattened towards uniform: affine registration leaves them blurry.
PRIOR_SOFTENING = 0.3
PAINTED_T1 = (0.25, 0.62, 0.92)  # CSF, GM, WM: mid-range T1 levels (models/data/synthesis.py) for tissue-only maps


@dataclass(frozen=True, eq=False)
class TrainingVolume:
    """One healthy volume on the model grid, as the preprocessing made it, and its tissue classes."""

    name: str
    volume: np.ndarray  # (50, 96, 96) float32 in [0, 1], 0 outside the brain
    brain_mask: np.ndarray  # bool, same shape
    tissue: np.ndarray | None  # (3, 50, 96, 96) float32 probabilities CSF, GM, WM; 0 outside the brain
    contrast: str | None = "t1"  # what ``volume`` was acquired in (t1, t2, flair, pd); None: painted, not acquired
    scaling: str = PREPROCESSING_VERSION  # the preprocessing version whose intensity scaling ``volume`` has


class DataError(ValueError):
    """A training source cannot be used; the message is one line naming the file and what is wrong."""


OFFLINE = "offline"  # the data name of the public brains that ship with the project's dependencies


def default_cache_dir() -> Path:
    """Preprocessed model-grid volumes are cached here (one compressed .npz per source, ~3 MB)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uad-node"


def healthy_volumes(
    data: str, cache_dir: Path, contrast: str = "t1", version: str = PREPROCESSING_VERSION
) -> list[TrainingVolume]:
    """``data`` = "offline" (the public brains; never Colin27) or a folder of NIfTI files / DICOM series, all
    scans of ``contrast``; preprocessed with preprocessing ``version`` (the current one, or a fine-tuned
    checkpoint's own)."""
    from models.atlas import load_mni152_atlas  # nilearn is slow to import

    atlas = load_mni152_atlas()
    if data == OFFLINE:
        return offline_volumes(atlas, cache_dir, version, spm_templates.spm_archive())
    return folder_volumes(Path(data), Preprocessor(atlas, contrast=contrast, version=version), cache_dir, contrast)


def offline_volumes(
    atlas: Atlas, cache_dir: Path, version: str = PREPROCESSING_VERSION, spm_archive: Path | None = None
) -> list[TrainingVolume]:
    """The public brains that may be trained on. Never Colin27.

    Always: the MNI152 2009 template (nilearn) and the ITK head (Debian). With SPM's archive (``make spm``
    installs spm-runtime, whose archive ``spm_templates.spm_archive()`` finds; models/data/spm_templates.py)
    also SPM's avg152 T1/T2/PD and avg305 T1 averages and its tissue probability maps. A missing Debian
    package raises FileNotFoundError saying which to install, rather than silently training on fewer
    brains; which brains a run used is in its checkpoint.
    """
    t1 = Preprocessor(atlas, version=version)
    volumes = [
        _cached(cache_dir, "mni152", b"loader:mni152_t1", t1, _mni152),
        _cached(cache_dir, "itk_head", b"loader:itk_head", t1, _itk_head),
    ]
    archive = spm_archive
    if archive is None:
        return volumes
    for image in spm_templates.SPM_IMAGES:
        preprocessor = Preprocessor(atlas, contrast=_registration_contrast(image.contrast), version=version)
        source = spm_templates.fingerprint(archive, image.member)
        build = functools.partial(_spm_image, archive, image)
        volumes.append(_cached(cache_dir, image.name, source, preprocessor, build))
    tissue_source = spm_templates.fingerprint(archive, spm_templates.TPM)
    volumes.append(_cached(cache_dir, "spm_tpm", tissue_source, t1, functools.partial(_spm_tissue, archive)))
    return volumes


def folder_volumes(
    folder: Path, preprocessor: Preprocessor, cache_dir: Path, contrast: str = "t1"
) -> list[TrainingVolume]:
    """A site's healthy scans of ``contrast``: NIfTI, MHA/MHD and NRRD files, and DICOM series (one volume per
    series).

    The folder is searched recursively; other files (sidecars, notes) are ignored, except ``.dcm`` files
    that belong to no readable series. Raises DataError for an empty folder, an unreadable file, or a
    scan the preprocessing rejects.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    sources = find_sources(folder)
    if not sources:
        raise DataError(f"{folder}: no NIfTI, MHA, NRRD or DICOM series found")
    return [
        _cached(cache_dir, source.name, source.fingerprint(), preprocessor, functools.partial(source.build, contrast))
        for source in sources
    ]


def _registration_contrast(contrast: str) -> str:
    """PD registers best to the T2 template (CSF bright, WM darkest, as on T2)."""
    return "t2" if contrast == "pd" else contrast


# --- sources ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """One volume in a folder: an image file, or the files of one DICOM series (in GDCM's sorted order)."""

    name: str
    files: tuple[Path, ...]
    series: bool

    def fingerprint(self) -> bytes:
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(path.read_bytes())
        return digest.digest()

    def build(self, contrast: str, preprocessor: Preprocessor) -> TrainingVolume:
        image = self.read()
        try:
            prepared = preprocessor(image)
        except PreprocessingError as error:
            raise DataError(f"{self.name}: preprocessing failed: {error}") from error
        tissue = clustered_tissue(prepared.volume, prepared.brain_mask, atlas_priors(prepared.geometry))
        return TrainingVolume(self.name, prepared.volume, prepared.brain_mask, tissue, contrast, preprocessor.version)

    def read(self) -> sitk.Image:
        """The volume as SimpleITK reads it; DataError naming the source when it cannot be read."""
        try:
            if self.series:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames([str(path) for path in self.files])
                return reader.Execute()
            return sitk.ReadImage(str(self.files[0]))
        except RuntimeError as error:
            reason = next((line for line in str(error).splitlines() if line.strip()), "unknown error")
            raise DataError(f"{self.name}: cannot be read as an image ({reason.strip()})") from error


def find_sources(folder: Path) -> list[ImageSource]:
    """Every image file and DICOM series below ``folder``, named by their path relative to it.

    Series come first, folder by folder; a ``.dcm`` file in no readable series is a DataError, since
    a scan silently left out would change what is trained or evaluated on.
    """
    sources: list[ImageSource] = []
    in_series: set[Path] = set()
    directories = [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]
    for directory in directories:
        for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory)):
            files = tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), series_id))
            in_series.update(files)
            name = f"{directory.relative_to(folder).as_posix()}/series-{series_id}"
            sources.append(ImageSource(name=name, files=files, series=True))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.name.lower().endswith(IMAGE_SUFFIXES):
            sources.append(ImageSource(name=name, files=(path,), series=False))
        elif path.suffix.lower() == ".dcm" and path not in in_series:
            raise DataError(f"{name}: not a readable DICOM image (it belongs to no series)")
    return sources


# --- the offline brains ----------------------------------------------------------------------------------


def _mni152(preprocessor: Preprocessor) -> TrainingVolume:
    """MNI152 with its own GM/WM probability templates; CSF is the rest of the brain."""
    image = brains.mni152_t1()
    prepared = preprocessor(image)
    grey = to_model_grid(brains.mni152_grey_matter(), prepared, "linear")
    white = to_model_grid(brains.mni152_white_matter(), prepared, "linear")
    tissue = _tissue_from_maps(grey, white, prepared.brain_mask)
    return TrainingVolume("mni152", prepared.volume, prepared.brain_mask, tissue, "t1", preprocessor.version)


def _itk_head(preprocessor: Preprocessor) -> TrainingVolume:
    """The ITK head: its k-means labels cover the whole head, so the tissue is clustered here instead."""
    return _clustered("itk_head", brains.itk_head(), "t1", preprocessor)


def _spm_image(archive: Path, image: spm_templates.SpmImage, preprocessor: Preprocessor) -> TrainingVolume:
    """An SPM average (whole head, 2 mm) through the preprocessing, its tissue clustered from its intensities."""
    return _clustered(image.name, spm_templates.read_image(archive, image.member), image.contrast, preprocessor)


def _spm_tissue(archive: Path, preprocessor: Preprocessor) -> TrainingVolume:
    """SPM's tissue probability maps on the model grid (they are in MNI space, as the grid is): anatomy only.

    The image is a T1 painted at the atlas's T1-like tissue levels, for whatever needs a picture of it (the
    atlas-mean baseline does not: it averages acquired images); training always paints it anew.
    """
    maps = spm_templates.tissue_maps(archive)
    geometry = preprocessor.geometry
    grey, white, csf = (atlas_to_model_grid(maps[name], geometry) for name in ("gm", "wm", "csf"))
    brain = (grey + white + csf) >= 0.5
    tissue = np.stack([csf, grey, white])
    tissue /= tissue.sum(axis=0, keepdims=True).clip(min=1e-6)
    tissue[:, ~brain] = 0.0
    painted = np.einsum("c,cdhw->dhw", np.asarray(PAINTED_T1, dtype=np.float32), tissue)
    volume = normalise(painted, brain, preprocessor.version)
    return TrainingVolume("spm_tpm", volume, brain, tissue.astype(np.float32), None, preprocessor.version)


def _clustered(name: str, image: sitk.Image, contrast: str, preprocessor: Preprocessor) -> TrainingVolume:
    prepared = preprocessor(image)
    tissue = clustered_tissue(prepared.volume, prepared.brain_mask, atlas_priors(prepared.geometry))
    return TrainingVolume(name, prepared.volume, prepared.brain_mask, tissue, contrast, preprocessor.version)


# --- tissue ----------------------------------------------------------------------------------------------


def atlas_priors(geometry: ModelGeometry) -> np.ndarray:
    """MNI152 CSF/GM/WM probabilities on the model grid (which lies in atlas space), (3, D, H, W).

    Used only to tell which intensity cluster is which tissue, whatever the contrast.
    """
    grey = atlas_to_model_grid(brains.mni152_grey_matter(), geometry)
    white = atlas_to_model_grid(brains.mni152_white_matter(), geometry)
    brain = atlas_to_model_grid(brains.mni152_brain_mask(), geometry)
    return np.stack([np.clip(brain - grey - white, 0.0, 1.0), grey, white]).astype(np.float32)


def clustered_tissue(
    volume: np.ndarray, brain_mask: np.ndarray, priors: np.ndarray, iterations: int = 40
) -> np.ndarray:
    """CSF/GM/WM probabilities from a 3-class Gaussian mixture of the intensities inside the brain.

    Soft posteriors, not hard labels, so partial-volume voxels stay mixed when contrast is synthesised.
    The atlas ``priors`` (3, D, H, W) start each class from its tissue's mean intensity and, softened,
    weight the classes voxel by voxel (as SPM's unified segmentation does): classes can never swap,
    whatever the contrast, and the broad, bias-tinged WM peak is not split off by intensity alone.
    """
    values = volume[brain_mask].astype(np.float64)
    weights = (1 - PRIOR_SOFTENING) * priors[:, brain_mask].T.astype(np.float64) + PRIOR_SOFTENING / 3  # (N, 3)
    posterior = weights / weights.sum(axis=1, keepdims=True)
    for _ in range(iterations):
        total = posterior.sum(axis=0) + 1e-12
        means = (posterior * values[:, None]).sum(axis=0) / total
        spreads = np.sqrt((posterior * (values[:, None] - means) ** 2).sum(axis=0) / total).clip(min=1e-2)
        log_p = np.log(weights) - np.log(spreads) - 0.5 * ((values[:, None] - means) / spreads) ** 2
        log_p -= log_p.max(axis=1, keepdims=True)
        posterior = np.exp(log_p)
        posterior /= posterior.sum(axis=1, keepdims=True)
    tissue = np.zeros((3, *volume.shape), dtype=np.float32)
    tissue[:, brain_mask] = posterior.T
    return tissue


def _tissue_from_maps(grey: np.ndarray, white: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """GM/WM probability maps to CSF/GM/WM summing to 1 inside the brain, 0 outside."""
    grey, white = np.clip(grey, 0.0, 1.0), np.clip(white, 0.0, 1.0)
    csf = np.clip(1.0 - grey - white, 0.0, 1.0)
    tissue = np.stack([csf, grey, white])
    tissue /= tissue.sum(axis=0, keepdims=True).clip(min=1e-6)
    tissue[:, ~brain_mask] = 0.0
    return tissue.astype(np.float32)


# --- cache -----------------------------------------------------------------------------------------------


def cache_key(source: bytes, preprocessor: Preprocessor) -> str:
    """What a cached volume depends on: its source, the preprocessing version, the registration template
    and the model grid (the ``ModelGeometry`` the preprocessor derived from its ``ModelGridSpec`` and atlas)."""
    digest = hashlib.sha256()
    for part in (b"uad-training-volume", CACHE_VERSION, preprocessor.version, preprocessor.contrast):
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    digest.update(repr(preprocessor.geometry).encode() + b"\0")
    digest.update(source)
    return digest.hexdigest()[:24]


def _cached(
    cache_dir: Path,
    name: str,
    source: bytes,
    preprocessor: Preprocessor,
    build: Callable[[Preprocessor], TrainingVolume],
) -> TrainingVolume:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-80:]
    path = cache_dir / f"{stem}-{cache_key(source, preprocessor)}.npz"
    if path.is_file():
        try:
            with np.load(path) as stored:
                tissue, contrast = stored["tissue"], str(stored["contrast"])
                return TrainingVolume(
                    name=name,
                    volume=stored["volume"],
                    brain_mask=stored["brain_mask"],
                    tissue=tissue if tissue.size else None,
                    contrast=contrast or None,
                    scaling=preprocessor.version,
                )
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    volume = build(preprocessor)
    _store(path, volume)
    return volume


def _store(path: Path, volume: TrainingVolume) -> None:
    """Compressed (~3 MB, loads in ~20 ms); written aside and renamed, so a crash leaves no truncated entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tissue = volume.tissue if volume.tissue is not None else np.zeros(0, dtype=np.float32)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez_compressed(
                file,
                volume=volume.volume,
                brain_mask=volume.brain_mask,
                tissue=tissue,
                contrast=np.str_(volume.contrast or ""),
            )
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the cache is no secret
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
