"""The anomaly mask as a DICOM Segmentation (highdicom): one BINARY segment whose frames lie on, and
reference, the source images, so SEG-aware viewers overlay it on the series it came from.

Geometry is never recomputed here: highdicom copies each frame's plane position from the source image
(single-frame series) or source frame (Enhanced MR) the frame is built from, and references it in the
frame's DerivationImageSequence. The volume's ``slice_sources`` say which source that is for slice k.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from node.config import ResultsSection
from node.results.findings import Findings
from node.results.sources import RESEARCH_NOTICE, equipment, header_only, new_uid, sources_by_uid
from node.volume import SeriesVolume

SEG_SERIES_DESCRIPTION = "UAD anomaly SEG (research use only)"
CONTENT_LABEL = "UAD_ANOMALY"  # CS: upper case, digits, space, underscore; at most 16 characters
CONTENT_DESCRIPTION = "Anomaly mask - research use only, not for diagnosis"  # LO: at most 64 characters
ANOMALY_LABEL = "Anomaly"  # the segment's label; the measurement SR tracks the finding under the same name

# Segmented property: what the segment is. The model flags anything unlike the healthy brains it learned,
# not a particular disease, so it claims no more than a structural abnormality: SCT 49755003
# "Morphologically Abnormal Structure" is a category of CID 7150 and the most general morphologic
# abnormality SNOMED has; as the type it says exactly that (a "lesion" or "neoplasm" type would claim a
# diagnosis the model cannot make). dcmqi and TCIA collections use the same code for unspecified findings.
CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
PROPERTY_TYPE = codes.SCT.MorphologicallyAbnormalStructure
# Algorithm family, CID 7162: DCM 123110 "Artificial Intelligence".
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence
# Display colour of the anomaly segment (CIELab of a saturated yellow-orange): stands out on grey MR.
ANOMALY_COLOUR = hd.color.CIELabColor(78.0, 20.0, 80.0)
SCORE_COLOUR = hd.color.CIELabColor(55.0, 70.0, 60.0)


def build_segmentation(
    series: SeriesVolume, sources: Sequence[Dataset], findings: Findings, options: ResultsSection
) -> Dataset:
    """The BINARY anomaly SEG of one series: new series and instance UIDs on every call, same patient and study.

    ``sources`` are the series' data sets (full or header-only; only headers are read), in any order.
    With ``options.seg_empty_frames == "omit"`` and nothing found, all frames are kept: a SEG needs at
    least one frame, and an all-empty SEG on every slice says "analysed, nothing found" in any viewer.
    """
    return build_segmentations(series, sources, findings, options)[0]


def build_segmentations(
    series: SeriesVolume, sources: Sequence[Dataset], findings: Findings, options: ResultsSection
) -> list[Dataset]:
    """Every SEG object of one series, in one new SEG series: the BINARY mask, then, with
    ``options.seg_score_segment``, the score map as a FRACTIONAL SEG.

    Two objects because one SEG instance has one SegmentationType: BINARY and FRACTIONAL segments
    cannot share it.
    """
    series_uid = new_uid()
    objects = [_binary(series, sources, findings, options, series_uid)]
    if options.seg_score_segment:
        objects.append(_fractional(series, sources, findings, options, series_uid))
    return objects


def _binary(
    series: SeriesVolume, sources: Sequence[Dataset], findings: Findings, options: ResultsSection, series_uid: str
) -> Dataset:
    description = _segment(1, ANOMALY_LABEL, findings, ANOMALY_COLOUR)
    description.SegmentDescription = f"Score >= {findings.threshold:.4g}; research use only"[:64]
    return _segmentation(
        series,
        sources,
        findings,
        options,
        series_uid=series_uid,
        instance_number=1,
        pixels=findings.mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        description=description,
        transfer_syntax_uid=ExplicitVRLittleEndian,  # BINARY allows no compression highdicom can write here
    )


def _fractional(
    series: SeriesVolume, sources: Sequence[Dataset], findings: Findings, options: ResultsSection, series_uid: str
) -> Dataset:
    """The score map scaled by its maximum into [0, 1]: a relative score, not a calibrated probability (the
    segment description says so and gives the scale)."""
    scale = findings.max_score if findings.max_score > 0 else 1.0
    fraction = np.clip(findings.score / np.float32(scale), 0.0, 1.0).astype(np.float32)
    description = _segment(1, "Anomaly score", findings, SCORE_COLOUR)  # numbering restarts per SEG instance
    # LO: at most 64 characters
    description.SegmentDescription = f"score/{scale:.4g} (threshold {findings.threshold:.4g}), not a probability"[:64]
    return _segmentation(
        series,
        sources,
        findings,
        options,
        series_uid=series_uid,
        instance_number=2,
        pixels=fraction,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        description=description,
        transfer_syntax_uid=RLELossless,  # pydicom encodes RLE itself; JPEG 2000 would need another codec package
    )


def _segment(number: int, label: str, findings: Findings, colour: hd.color.CIELabColor) -> hd.seg.SegmentDescription:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=findings.model_name[:64], family=ALGORITHM_FAMILY, version=findings.model_version[:64], source="uad-node"
    )
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=CATEGORY,
        segmented_property_type=PROPERTY_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=colour,
    )


def _segmentation(
    series: SeriesVolume,
    sources: Sequence[Dataset],
    findings: Findings,
    options: ResultsSection,
    *,
    series_uid: str,
    instance_number: int,
    pixels: np.ndarray,
    segmentation_type: hd.seg.SegmentationTypeValues,
    description: hd.seg.SegmentDescription,
    transfer_syntax_uid: str,
) -> Dataset:
    grid = tuple(reversed(series.image.GetSize()))
    if pixels.shape != grid:
        raise ValueError(f"findings {pixels.shape} do not lie on the series grid {grid} (slices, rows, columns)")
    source_images, frames = _source_frames(series, sources, pixels)
    omit = options.seg_empty_frames == "omit" and bool(findings.mask.any())
    made_by = equipment(options)
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=frames,
        segmentation_type=segmentation_type,
        segment_descriptions=[description],
        series_instance_uid=series_uid,
        series_number=options.seg_series_number,
        sop_instance_uid=new_uid(),
        instance_number=instance_number,
        manufacturer=made_by.manufacturer,
        manufacturer_model_name=made_by.model_name,
        software_versions=made_by.software_versions,
        device_serial_number=made_by.device_serial_number,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        content_description=CONTENT_DESCRIPTION,
        content_label=CONTENT_LABEL,
        content_creator_name=None,  # Type 2, left empty: an algorithm made it, not a person
        transfer_syntax_uid=transfer_syntax_uid,
        omit_empty_frames=omit,
        series_description=SEG_SERIES_DESCRIPTION,
        institution_name=made_by.institution_name,
    )
    seg.ImageComments = RESEARCH_NOTICE
    return seg


def _source_frames(
    series: SeriesVolume, sources: Sequence[Dataset], pixels: np.ndarray
) -> tuple[list[Dataset], np.ndarray]:
    """The source images in the order highdicom pairs them with frames, and the frames in that order.

    Single-frame series: one source image per slice k, in slice order. Enhanced MR: the one multi-frame
    image, and frame j of the SEG built from the slice that came from source frame j + 1.
    """
    by_uid = sources_by_uid(series, sources)
    slices = series.slice_sources
    if all(s.frame_number is None for s in slices):
        return [header_only(by_uid[s.sop_instance_uid]) for s in slices], pixels
    instances = {s.sop_instance_uid for s in slices}
    if len(instances) > 1 or any(s.frame_number is None for s in slices):
        raise ValueError(
            "a SEG can reference only one multi-frame source image; this series spreads its slices over "
            f"{len(instances)} instances"
        )
    source = header_only(by_uid[slices[0].sop_instance_uid])
    if int(source.get("NumberOfFrames", 1)) != len(slices):
        raise ValueError(f"the source image has {source.NumberOfFrames} frames but the volume {len(slices)} slices")
    in_frame_order = np.empty_like(pixels)
    for k, s in enumerate(slices):
        in_frame_order[s.frame_number - 1] = pixels[k]  # type: ignore[operator]
    return [source], in_frame_order
