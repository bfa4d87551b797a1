"""uad-node: DICOM in, DICOM out. Receives studies, tracks them, returns results to PACS."""

__version__ = "0.1.0"

# Identifies files and associations written by this software (a UUID-derived UID, PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = "2.25.36048062905862369046221926658088355001"
IMPLEMENTATION_VERSION_NAME = "UADNODE_" + __version__.replace(".", "")
