"""STOW-RS request bodies for tests, built with urllib3's multipart encoder (not the node's own), so the
receiver is tested against framing it did not write."""

from __future__ import annotations

import copy
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset
from urllib3.fields import RequestField
from urllib3.filepost import encode_multipart_formdata

DICOM = "application/dicom"


def part10(ds: Dataset) -> bytes:
    """A whole Part 10 file, as a STOW-RS client sends it."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, copy.deepcopy(ds), enforce_file_format=True)
    return buffer.getvalue()


def stow_body(contents: list[bytes], part_type: str = DICOM, related_type: str = DICOM) -> tuple[bytes, str]:
    """multipart/related body and its Content-Type: one ``part_type`` part per content."""
    fields = []
    for index, content in enumerate(contents):
        field = RequestField(name=f"file{index}", data=content)
        field.make_multipart(content_type=part_type)
        fields.append(field)
    body, form_type = encode_multipart_formdata(fields)
    boundary = form_type.split("boundary=", 1)[1]
    return body, f'multipart/related; type="{related_type}"; boundary={boundary}'
