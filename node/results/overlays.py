"""Secondary Capture overlay images: the slices with the largest findings, score in colour over grey anatomy,
for every PACS and viewer, including those that cannot show a SEG.

One RGB image per chosen slice, in the source's own in-plane orientation, resampled to square pixels
(PixelSpacing says their size), with a burned-in band that says research use only and which source
image the slice is. Each image references its source image (and frame).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node.config import ResultsSection
from node.results.findings import Findings
from node.results.render import (
    NOTICE,
    TEXT,
    Scale,
    display_size,
    draw_orientation,
    render_slice,
    series_scale,
    stack,
    text_band,
)
from node.results.sources import (
    RESEARCH_NOTICE,
    equipment,
    image_reference,
    new_uid,
    patient_orientation,
    slice_position_mm,
    sources_by_uid,
    study_attributes,
)
from node.volume import SeriesVolume, SliceSource

SC_SERIES_DESCRIPTION = "UAD anomaly overlays (research use only)"
OVERLAY_LONGEST_SIDE = 512  # display pixels along the longer side: readable text, small files


def overlay_slices(findings: Findings, cap: int) -> list[int]:
    """The slices worth an overlay image: the ``cap`` with the largest finding area (ties: lower k), in
    slice order so a reader scrolls through them as through the series."""
    areas = findings.slice_areas()
    with_findings = np.flatnonzero(areas)
    largest = sorted(with_findings, key=lambda k: (-int(areas[k]), int(k)))[: max(cap, 0)]
    return sorted(int(k) for k in largest)


def build_overlays(
    series: SeriesVolume,
    sources: Sequence[Dataset],
    findings: Findings,
    options: ResultsSection,
    *,
    series_instance_uid: str | None = None,
    first_instance_number: int = 1,
) -> list[Dataset]:
    """One RGB Secondary Capture per slice with findings (at most ``options.max_overlay_images``), all in one
    new series (or in ``series_instance_uid``, to share the series with the summary image); new UIDs on
    every call. Nothing found gives an empty list."""
    chosen = overlay_slices(findings, options.max_overlay_images)
    if not chosen:
        return []
    by_uid = sources_by_uid(series, sources)
    series_uid = series_instance_uid or new_uid()
    voxels = sitk.GetArrayViewFromImage(series.image)
    scale = series_scale(voxels, findings.score, findings.threshold, findings.max_score)
    objects = []
    for number, k in enumerate(chosen, start=first_instance_number):
        source = series.slice_sources[k]
        picture, pixel_mm = overlay_picture(series, voxels, findings, scale, k, _slice_name(by_uid, source))
        objects.append(
            secondary_capture(
                picture,
                series,
                by_uid[source.sop_instance_uid],
                [source],
                options,
                series_instance_uid=series_uid,
                instance_number=number,
                pixel_spacing_mm=pixel_mm,
                derivation=f"Anomaly score overlay of {_slice_name(by_uid, source)}, slice {k + 1} of "
                f"{len(series.slice_sources)}; {RESEARCH_NOTICE.lower()}",
            )
        )
    return objects


def overlay_picture(
    series: SeriesVolume, voxels: np.ndarray, findings: Findings, scale: Scale, k: int, name: str
) -> tuple[Image.Image, float]:
    """Slice k with its findings and the burned-in band naming it (``name``: its source image); and the size of
    one display pixel, mm."""
    column_mm, row_mm, _ = series.image.GetSpacing()
    rows, columns = voxels.shape[1:]
    size = display_size(rows, columns, row_mm, column_mm, OVERLAY_LONGEST_SIDE)
    picture = render_slice(voxels[k], findings.score[k], findings.mask[k], scale, size)
    draw_orientation(picture, patient_orientation(series), 18)
    area_cm2 = float(findings.slice_areas()[k]) * row_mm * column_mm / 100.0
    slice_max = float(findings.score[k].max())
    position = slice_position_mm(series, k)
    band = text_band(
        picture.size[0],
        [
            (RESEARCH_NOTICE, NOTICE),
            (f"{name} | slice {k + 1} of {len(series.slice_sources)} | position {position:.1f} mm", TEXT),
            (f"finding {area_cm2:.2f} cm2 | max score {slice_max:.3g} (threshold {findings.threshold:.3g})", TEXT),
            (f"{findings.model_name} {findings.model_version}", TEXT),
        ],
        15,
    )
    return stack([picture, band]), max(rows * row_mm, columns * column_mm) / max(size)


def secondary_capture(
    picture: Image.Image,
    series: SeriesVolume | None,
    source: Dataset,
    references: Sequence[SliceSource],
    options: ResultsSection,
    *,
    series_instance_uid: str,
    instance_number: int,
    pixel_spacing_mm: float | None,
    derivation: str,
    series_number: int | None = None,
    series_description: str = SC_SERIES_DESCRIPTION,
    comments: str = RESEARCH_NOTICE,
) -> Dataset:
    """An RGB Secondary Capture of ``picture`` in the source's study, referencing ``references``.

    ``series`` gives the orientation letters of a picture drawn from it; None for one that shows no anatomy
    (PatientOrientation is then empty). ``pixel_spacing_mm`` is the size of one (square) pixel, or None for
    a composite whose panels differ (or a picture of text). The series number is the overlay series' unless
    given; ``comments`` (ImageComments, LT) should say research use only.
    """
    made_by = equipment(options)
    # highdicom wants letters for a PATIENT image; a picture of no anatomy gets placeholders, emptied below
    orientation = patient_orientation(series) if series is not None else ("L", "P")
    pixels = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=options.overlay_series_number if series_number is None else series_number,
        sop_instance_uid=new_uid(),
        instance_number=instance_number,
        manufacturer=made_by.manufacturer,
        pixel_spacing=(pixel_spacing_mm, pixel_spacing_mm) if pixel_spacing_mm else None,
        # highdicom accepts single letters only; the refined letters are set below
        patient_orientation=(orientation[0][0], orientation[1][0]),
        series_description=series_description[:64],
        manufacturer_model_name=made_by.model_name,
        software_versions=made_by.software_versions,
        device_serial_number=made_by.device_serial_number,
        institution_name=made_by.institution_name,
        **study_attributes(source),  # type: ignore[arg-type]
    )
    # Type 2C: empty when the picture is not of the patient (a notice), the refined letters otherwise
    sc.PatientOrientation = list(orientation) if series is not None else ""
    sc.ConversionType = "WSD"  # made on a workstation (highdicom writes DI, "digital interface")
    # A brain is no paired body part: with BodyPartExamined the General Series module needs no Laterality
    sc.BodyPartExamined = str(source.get("BodyPartExamined", "") or "BRAIN")
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"  # research notice and slice figures; no patient data is burned in
    sc.ImageComments = comments[:10240]
    sc.DerivationDescription = derivation[:1024]
    sc.LossyImageCompression = "00"
    if "SpecificCharacterSet" in source:
        sc.SpecificCharacterSet = source.SpecificCharacterSet
    sc.ReferencedImageSequence = DicomSequence([image_reference(r) for r in references])
    sc.SourceImageSequence = DicomSequence([image_reference(r) for r in references])
    return sc


def _slice_name(by_uid: dict[str, Dataset], source: SliceSource) -> str:
    """How a reader finds the source image in the viewer: its instance number (and frame)."""
    number = by_uid[source.sop_instance_uid].get("InstanceNumber")
    name = f"image {number}" if number is not None else "the source image"
    return f"{name} frame {source.frame_number}" if source.frame_number is not None else name
