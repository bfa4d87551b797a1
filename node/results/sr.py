"""The anomaly volume as a DICOM Structured Report: a TID 1500 Measurement Report (Comprehensive 3D SR) whose
one measurement group measures the SEG's anomaly segment.

PACS, reporting systems and worklists read SR measurements without rendering anything: the volume lands in
a report field or a query result, where the SEG and the Secondary Captures are only pictures. The group
references the segment by the SEG's SOP Instance UID and segment number and the series it was computed
from, names the algorithm, and carries the volume in mL; an empty mask is measured as 0 mL, so "analysed,
nothing found" is explicit too.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

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
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(), identifier=ANOMALY_LABEL),  # as the SEG segment
        referenced_segment=_anomaly_segment(segmentation),
        finding_category=CATEGORY,
        finding_type=PROPERTY_TYPE,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=findings.model_name[:64], version=findings.model_version[:64], family=ALGORITHM_FAMILY
        ),
        measurements=[hd.sr.Measurement(name=VOLUME, value=round(findings.anomaly_volume_ml, 3), unit=MILLILITRE)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device_observer(made_by)),
        procedure_reported=PROCEDURE,
        imaging_measurements=[group],
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
