"""uad-node: DICOM in, DICOM out. Receives studies, tracks them, returns results to PACS."""

__version__ = "0.1.0"
