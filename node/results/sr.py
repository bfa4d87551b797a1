"""The anomaly volume as a DICOM Structured Report: a TID 1500 Measurement Report (Comprehensive 3D SR) whose
volumetric measurement group measures the SEG's anomaly segment.

PACS, reporting systems and worklists read SR measurements without rendering anything: the volume lands in
a report field or a query result, where the SEG and the Secondary Captures are only pictures. The group
references the segment by the SEG's SOP Instance UID and segment number and the series it was computed
from, names the algorithm, and carries the volume in mL; an empty mask is measured as 0 mL, so "analysed,
nothing found" is explicit too.

When something was found, a second group (TID 1410 Planar ROI) outlines the segment on one image: the SEG frame
holding most of it, SELECTED FROM that frame's source image. It shares the first group's tracking identifier
and UID, so a reader sees one finding measured as a volume and drawn on its largest slice. OHIF 3.13 shows an
SR measurement only through such image coordinates (its SR loader merges the groups of one tracking UID and
reads the first SCOORD); a group without any fails there (``Cannot read properties of undefined (reading
'ReferencedSOPSequence')``) and blanks the viewport. An empty segment has no outline, and none is invented:
OHIF cannot show the 0 mL report of a series with nothing found.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from scipy import ndimage

from node.config import ResultsSection
from node.results.findings import Findings
from node.results.seg import ALGORITHM_FAMILY, ANOMALY_LABEL, CATEGORY, PROPERTY_TYPE
from node.results.sources import Equipment, equipment, new_uid

SR_SERIES_DESCRIPTION = "UAD anomaly measurements (research use only)"
PROCEDURE = codes.LN.BrainMRI  # LN 24590-2 "Brain MRI"
MILLILITRE = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
VOLUME = codes.SCT.Volume  # SCT 118565006


def build_measurement_report(
    segmentation: Dataset, sources: Sequence[Dataset], findings: Findings, options: ResultsSection
) -> Dataset:
    """The TID 1500 report of one analysed series: new series and instance UIDs on every call, same patient
    and study as ``segmentation`` (the BINARY anomaly SEG built from ``sources`` and ``findings``)."""
    made_by = equipment(options)
    tracking = hd.sr.TrackingIdentifier(uid=new_uid(), identifier=ANOMALY_LABEL)  # as the SEG segment
    algorithm = hd.sr.AlgorithmIdentification(
        name=findings.model_name[:64], version=findings.model_version[:64], family=ALGORITHM_FAMILY
    )
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=_anomaly_segment(segmentation),
            finding_category=CATEGORY,
            finding_type=PROPERTY_TYPE,
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=VOLUME, value=round(findings.anomaly_volume_ml, 3), unit=MILLILITRE)],
        )
    ]
    if (outline := _outline_on_largest_frame(segmentation)) is not None:
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_region=outline,
                finding_category=CATEGORY,
                finding_type=PROPERTY_TYPE,
                algorithm_id=algorithm,
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device_observer(made_by)),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[segmentation, *sources],  # only their UIDs are read
        content=report,
        series_instance_uid=new_uid(),
        series_number=options.sr_series_number,
        sop_instance_uid=new_uid(),
        instance_number=1,
        manufacturer=made_by.manufacturer,
        institution_name=made_by.institution_name,
        is_complete=True,  # nothing more will be added; unverified: no person has checked it
    )
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    return sr


def _anomaly_segment(segmentation: Dataset) -> hd.sr.ReferencedSegment:
    """Segment 1 of the SEG and the series it was computed from: one reference rather than one per source
    image (the SEG itself lists those). ``ReferencedSegment.from_segmentation`` would look for the segment in
    per-frame groups; a one-segment SEG from highdicom holds it in the shared ones."""
    [series] = segmentation.ReferencedSeriesSequence
    return hd.sr.ReferencedSegment(
        sop_class_uid=segmentation.SOPClassUID,
        sop_instance_uid=segmentation.SOPInstanceUID,
        segment_number=1,
        source_series=hd.sr.SourceSeriesForSegmentation(series.SeriesInstanceUID),
    )


def _outline_on_largest_frame(segmentation: Dataset) -> hd.sr.ImageRegion | None:
    """The outline of the largest 2D region of the SEG frame with the most segment pixels, on that frame's
    source image (and source frame, for a multi-frame source); None for an empty segment. Read from the SEG
    itself, so the outline is the segment the report measures."""
    pixels = np.asarray(segmentation.pixel_array, dtype=bool).reshape(-1, segmentation.Rows, segmentation.Columns)
    areas = pixels.sum(axis=(1, 2))
    if not areas.any():
        return None
    frame = int(np.argmax(areas))
    [derivation] = segmentation.PerFrameFunctionalGroupsSequence[frame].DerivationImageSequence
    [source] = derivation.SourceImageSequence
    frame_number = source.get("ReferencedFrameNumber")
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_outer_boundary(pixels[frame]),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.ReferencedSOPClassUID,
            referenced_sop_instance_uid=source.ReferencedSOPInstanceUID,
            referenced_frame_numbers=None if frame_number is None else [int(frame_number)],
        ),
    )


def _outer_boundary(mask: np.ndarray) -> np.ndarray:
    """The closed outline (column, row) along pixel edges of the largest 4-connected region of a 2D mask, holes
    filled, as DICOM image coordinates (0, 0 is the top left corner of the top left pixel); first point repeated
    last, points only where the outline turns. Holes filled, such a region has one boundary loop, and every
    corner on it starts exactly one boundary edge, so following the edges walks the loop."""
    labels, count = ndimage.label(mask)
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1 if count > 1 else 1
    region = np.pad(ndimage.binary_fill_holes(labels == largest), 1)
    next_corner: dict[tuple[int, int], tuple[int, int]] = {}
    # Each pixel's edges, clockwise on screen (rows grow downwards), kept where the neighbour across is outside.
    for r, c in zip(*np.nonzero(region), strict=True):
        x, y = c - 1, r - 1  # back to unpadded coordinates
        if not region[r - 1, c]:
            next_corner[(x, y)] = (x + 1, y)
        if not region[r, c + 1]:
            next_corner[(x + 1, y)] = (x + 1, y + 1)
        if not region[r + 1, c]:
            next_corner[(x + 1, y + 1)] = (x, y + 1)
        if not region[r, c - 1]:
            next_corner[(x, y + 1)] = (x, y)
    start = min(next_corner)
    loop = [start]
    while (corner := next_corner[loop[-1]]) != start:
        if len(loop) > len(next_corner):
            raise AssertionError("the region's boundary edges do not form one loop")
        loop.append(corner)
    points = np.array(loop, dtype=float)
    into, out = points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points
    turns = into[:, 0] * out[:, 1] != into[:, 1] * out[:, 0]  # drop corners in the middle of a straight run
    return np.vstack([points[turns], points[turns][:1]])


def _device_observer(made_by: Equipment) -> hd.sr.ObserverContext:
    """The node as the observer. Its Device Observer UID is derived from manufacturer and serial number,
    so reports from one node share it across runs and restarts."""
    uid = generate_uid(
        prefix=None, entropy_srcs=["uad-node device", made_by.manufacturer, made_by.device_serial_number]
    )
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid,
            name=made_by.model_name,
            manufacturer_name=made_by.manufacturer,
            model_name=made_by.model_name,
            serial_number=made_by.device_serial_number,
        ),
    )
