"""DICOM series -> SimpleITK volume: sort, check and stack the slices of one series with exact physical
geometry, remembering which source image (and frame) each slice came from.

A series that cannot be one regular volume raises ``VolumeRejected`` with a specific reason.
"""

from node.volume.assemble import SeriesVolume, series_to_volume
from node.volume.frames import SliceSource
from node.volume.rejection import VolumeRejected

__all__ = ["SeriesVolume", "SliceSource", "VolumeRejected", "series_to_volume"]
