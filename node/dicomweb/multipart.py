"""multipart/related (RFC 2387, RFC 2046 5.1) as STOW-RS uses it: one Part 10 file per part.

A small strict splitter instead of the stdlib ``email`` parser: that one walks the body line by line in
Python and took 0.32 s for 50 parts of 113 KB on these machines (as long as storing them durably), while
the delimiter search here runs in C (``bytes.find``) and hands out zero-copy views of the parts.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message

_CRLF = b"\r\n"
MAX_HEADER_BYTES = 16_384  # per part; a part header is a few lines
# RFC 2046 allows 70, but Orthanc 1.10's DICOMweb client sends 73 (two UUIDs): be liberal in what we accept.
MAX_BOUNDARY = 256


class MultipartError(ValueError):
    """The body is not well-formed multipart (answered 400 Bad Request)."""


@dataclass(frozen=True)
class MediaType:
    """A parsed Content-Type: the lower-cased ``type/subtype`` and its parameters (names lower-cased)."""

    essence: str
    params: dict[str, str]


@dataclass(frozen=True)
class Part:
    """One body part: its headers (names lower-cased) and its content, a view into the request body."""

    headers: dict[str, str]
    content: memoryview

    @property
    def media_type(self) -> MediaType:
        """The part's Content-Type; RFC 2046 5.1 makes text/plain the default, never application/dicom."""
        return parse_media_type(self.headers.get("content-type", "text/plain"))


def parse_media_type(value: str) -> MediaType:
    """Content-Type header -> media type and parameters (quoted values unquoted, as RFC 9110 8.3.1 allows)."""
    message = Message()
    message["Content-Type"] = value
    essence = value.split(";", 1)[0].strip().lower()
    params = {str(k).lower(): str(v) for k, v in message.get_params(failobj=[], header="content-type")[1:]}
    return MediaType(essence=essence, params=params)


def split_parts(body: bytes | memoryview, boundary: str) -> list[Part]:
    """The body parts between the first delimiter and the close delimiter; MultipartError if malformed.

    The preamble and epilogue are ignored (RFC 2046). Line breaks must be CRLF, as HTTP multipart requires.
    """
    if not 1 <= len(boundary) <= MAX_BOUNDARY:
        raise MultipartError(f"boundary must be 1 to {MAX_BOUNDARY} characters")
    data = bytes(body) if not isinstance(body, bytes) else body
    view = memoryview(data)
    dash = b"--" + boundary.encode("latin-1")
    delimiter = _CRLF + dash
    position = 0 if data.startswith(dash) else data.find(delimiter)
    if position < 0:
        raise MultipartError("no boundary delimiter in the body")
    position += len(dash) if position == 0 else len(delimiter)
    parts: list[Part] = []
    while True:
        if data.startswith(b"--", position):
            return parts  # close delimiter
        line_end = data.find(_CRLF, position)
        if line_end < 0 or data[position:line_end].strip(b" \t"):
            raise MultipartError("boundary delimiter not followed by a line break")
        start = line_end + 2
        end = data.find(delimiter, start)
        if end < 0:
            raise MultipartError("body ends without a close delimiter")
        parts.append(_part(view, start, end))
        position = end + len(delimiter)


def _part(view: memoryview, start: int, end: int) -> Part:
    data = view.obj
    assert isinstance(data, bytes)
    if data.startswith(_CRLF, start):  # no headers at all
        return Part(headers={}, content=view[start + 2 : end])
    header_end = data.find(_CRLF * 2, start, min(end, start + MAX_HEADER_BYTES))
    if header_end < 0:
        raise MultipartError("part headers do not end with an empty line")
    headers: dict[str, str] = {}
    for line in data[start:header_end].split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep or not name.strip():
            raise MultipartError("malformed part header line")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return Part(headers=headers, content=view[header_end + 4 : end])


def related_body(contents: Iterable[bytes], media_type: str = "application/dicom") -> tuple[bytes, str]:
    """Build a multipart/related body of ``media_type`` parts; returns it and its Content-Type header.

    The boundary is random, so a file that happens to contain an earlier boundary cannot cut the body.
    """
    boundary = f"uad-node-{uuid.uuid4().hex}"
    dash = b"--" + boundary.encode("ascii")
    head = dash + b"\r\nContent-Type: " + media_type.encode("ascii") + b"\r\n\r\n"
    chunks: list[bytes] = []
    for content in contents:
        chunks += [head, content, _CRLF]
    chunks.append(dash + b"--" + _CRLF)
    return b"".join(chunks), f'multipart/related; type="{media_type}"; boundary={boundary}'
