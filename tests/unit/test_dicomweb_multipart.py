"""The multipart/related splitter and the Part 10 splitter that STOW-RS in relies on: what real clients send
(preamble, Orthanc's over-long boundary, parts without headers) is read exactly; anything cut short is an error."""

from __future__ import annotations

import os

import pytest

from node.dicomweb.multipart import MultipartError, parse_media_type, related_body, split_parts
from node.receiver.part10 import read_header, split_part10
from tests.dicomweb_bodies import part10
from tests.mr_files import mr_series


def test_round_trip_keeps_binary_content_exactly() -> None:
    contents = [os.urandom(5000) + b"\r\n--not-the-boundary\r\n", b"", b"\r\n\r\n"]
    body, content_type = related_body(contents)
    media = parse_media_type(content_type)
    assert (media.essence, media.params["type"]) == ("multipart/related", "application/dicom")
    parts = split_parts(body, media.params["boundary"])
    assert [bytes(p.content) for p in parts] == contents
    assert {p.headers["content-type"] for p in parts} == {"application/dicom"}


def test_preamble_epilogue_headerless_parts_and_orthancs_73_character_boundary() -> None:
    boundary = "25629b3e-e47b-4cc7-a9a3-0e58ca9ee240-25629b3e-e47b-4cc7-a9a3-0e58ca9ee240"  # as Orthanc 1.10 sends
    body = (
        f"preamble\r\n--{boundary}\r\n\r\nfirst\r\n--{boundary}  \r\nContent-Type: Application/DICOM\r\n"
        f"Content-Length: 6\r\n\r\nsecond\r\n--{boundary}--\r\nepilogue"
    ).encode()
    first, second = split_parts(body, boundary)
    assert (first.headers, bytes(first.content)) == ({}, b"first")
    assert first.media_type.essence == "text/plain"  # RFC 2046 default: not DICOM
    assert bytes(second.content) == b"second" and second.media_type.essence == "application/dicom"


@pytest.mark.parametrize(
    "body",
    [
        b"no delimiter at all",
        b"--b\r\n\r\ncontent without a close delimiter",
        b"--b\r\nno header end",
        b"--bjunk\r\n\r\nx\r\n--b--",
        b"--b\r\nnot a header line\r\n\r\nx\r\n--b--",
    ],
)
def test_malformed_bodies_are_errors(body: bytes) -> None:
    with pytest.raises(MultipartError):
        split_parts(body, "b")


def test_part10_split_finds_the_data_set_the_c_store_path_reads() -> None:
    [ds] = mr_series(1, size=8)
    file = split_part10(part10(ds))
    assert (file.transfer_syntax_uid, file.media_storage_sop_instance_uid) == (
        str(ds.file_meta.TransferSyntaxUID),
        str(ds.SOPInstanceUID),
    )
    header = read_header(file.dataset, file.transfer_syntax_uid)
    assert (header.sop_instance_uid, header.series_uid) == (str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))


@pytest.mark.parametrize("cut", [0, 100, 131, 140, 160])
def test_part10_split_refuses_what_is_not_a_whole_file_meta(cut: int) -> None:
    [ds] = mr_series(1, size=8)
    data = part10(ds)
    with pytest.raises(ValueError):
        split_part10(data[:cut] if cut else b"\x00" * 128 + b"DCMX" + data[132:])
