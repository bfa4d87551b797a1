"""The DICOM receiver: C-ECHO and C-STORE SCP with durable storage."""

from node.receiver.server import Receiver

__all__ = ["Receiver"]
