"""The DICOM file format (PS3.10) around a received data set, and reading its filing attributes.

Both run once per received image, so neither builds a pydicom ``Dataset`` for
the file meta nor decodes more than the first groups of the data set: the
generic paths cost more than the fsyncs on these machines.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.uids import is_valid_uid

_PREAMBLE = b"\x00" * 128 + b"DICM"


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str) -> bytes:
    """Preamble, prefix and group 0002 (explicit VR little endian, as PS3.10 7.1 requires)."""
    body = b"".join(
        [
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", pad_uid(sop_class_uid)),
            _element(0x0003, b"UI", pad_uid(sop_instance_uid)),
            _element(0x0010, b"UI", pad_uid(transfer_syntax_uid)),
            _element(0x0012, b"UI", pad_uid(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, b"SH", pad_text(IMPLEMENTATION_VERSION_NAME)),
            *([_element(0x0016, b"AE", pad_text(source_ae))] if source_ae else []),
        ]
    )
    return _PREAMBLE + _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # 2 reserved bytes and a 32-bit length
        return struct.pack("<HH", 0x0002, element) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def pad_uid(value: str) -> bytes:
    """UIDs are NUL-padded to an even length (PS3.5 9.1)."""
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def pad_text(value: str) -> bytes:
    """Text values are space-padded to an even length (PS3.5 6.2)."""
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


@dataclass(frozen=True)
class InstanceHeader:
    """What the node files an instance under: the start of its data set and its transfer syntax."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    instance_number: int | None = None
    patient_id: str = ""  # for logs only, and only when logging.log_patient_data is on

    def invalid_uid(self) -> str | None:
        """The name of the first missing or malformed UID (these become paths), or None."""
        for name in ("sop_class_uid", "sop_instance_uid", "study_uid", "series_uid", "transfer_syntax_uid"):
            if not is_valid_uid(getattr(self, name)):
                return name
        return None


_LAST_NEEDED = BaseTag(0x00200013)  # InstanceNumber; every attribute read lies at or before it


def read_header(dataset: bytes | memoryview, transfer_syntax_uid: str) -> InstanceHeader:
    """Parse the data set only up to Instance Number; raises ValueError when it cannot be read.

    Little endian data sets whose first elements are plain (defined lengths, printable ASCII values, one
    value each) are read by a direct scan (~20x faster than pydicom); anything else, and every data set the
    scan is not sure of, is read by pydicom as before, so both give the same header."""
    if transfer_syntax_uid != ExplicitVRBigEndian and transfer_syntax_uid != DeflatedExplicitVRLittleEndian:
        header = _scan_header(memoryview(dataset), transfer_syntax_uid)
        if header is not None:
            return header
    return _read_header_pydicom(dataset, transfer_syntax_uid)


def _read_header_pydicom(dataset: bytes | memoryview, transfer_syntax_uid: str) -> InstanceHeader:
    """``read_header`` by pydicom: any transfer syntax, any encoding pydicom reads."""
    try:
        raw = bytes(dataset)
        if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
            raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw)
        ds = read_dataset(
            WholeReads(raw),
            is_implicit_VR=transfer_syntax_uid == ImplicitVRLittleEndian,
            is_little_endian=transfer_syntax_uid != ExplicitVRBigEndian,
            stop_when=lambda tag, vr, length: tag > _LAST_NEEDED,
            defer_size=None,
        )
        return InstanceHeader(
            sop_class_uid=_str(ds.get("SOPClassUID")),
            sop_instance_uid=_str(ds.get("SOPInstanceUID")),
            study_uid=_str(ds.get("StudyInstanceUID")),
            series_uid=_str(ds.get("SeriesInstanceUID")),
            transfer_syntax_uid=transfer_syntax_uid,
            modality=_str(ds.get("Modality")),
            series_number=_int(ds.get("SeriesNumber")),
            series_description=_str(ds.get("SeriesDescription")),
            instance_number=_int(ds.get("InstanceNumber")),
            patient_id=_str(ds.get("PatientID")),
        )
    except Exception as exc:  # pydicom raises many types on malformed input; all mean "unreadable"
        raise ValueError(f"unreadable data set ({type(exc).__name__})") from exc


# The elements read_header needs: (group << 16 | element) -> (field, VR as encoded in explicit VR).
_NEEDED = {
    0x00080016: ("sop_class_uid", b"UI"),
    0x00080018: ("sop_instance_uid", b"UI"),
    0x00080060: ("modality", b"CS"),
    0x0008103E: ("series_description", b"LO"),
    0x00100020: ("patient_id", b"LO"),
    0x0020000D: ("study_uid", b"UI"),
    0x0020000E: ("series_uid", b"UI"),
    0x00200011: ("series_number", b"IS"),
    0x00200013: ("instance_number", b"IS"),
}
_EXPLICIT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_PLAIN_TEXT = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII without backslash: one plain value
_PLAIN_UID = re.compile(rb"[\x20-\x5b\x5d-\x7e]*\x00?")  # ... and UIDs may end in their NUL pad
_TAG_LE = struct.Struct("<HH")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_LENGTH_32 = struct.Struct("<I")


def _scan_header(view: memoryview, transfer_syntax_uid: str) -> InstanceHeader | None:
    """The header by a direct scan of a little endian data set, or None whenever pydicom must decide
    (undefined lengths, values cut off by the end, unexpected VRs, non-ASCII or multi-valued text)."""
    implicit = transfer_syntax_uid == ImplicitVRLittleEndian
    size = len(view)
    position = 0
    found: dict[str, bytes] = {}
    while position < size:
        if position + 8 > size:
            return None
        if implicit:
            group, element = _TAG_LE.unpack_from(view, position)
            (length,) = _LENGTH_32.unpack_from(view, position + 4)
            vr = None
            position += 8
        else:
            group, element, vr, length = _EXPLICIT_SHORT.unpack_from(view, position)
            if vr not in _EXPLICIT_VRS:
                return None
            if vr in _LONG_LENGTH_VRS:
                if position + 12 > size:
                    return None
                (length,) = _LENGTH_32.unpack_from(view, position + 8)
                position += 12
            else:
                position += 8
        tag = group << 16 | element
        if tag > _LAST_NEEDED:
            break
        if length == 0xFFFFFFFF or position + length > size:
            return None
        needed = _NEEDED.get(tag)
        if needed is not None:
            name, expected_vr = needed
            if vr is not None and vr != expected_vr:
                return None
            value = bytes(view[position : position + length])
            if (_PLAIN_UID if expected_vr == b"UI" else _PLAIN_TEXT).fullmatch(value) is None:
                return None
            found[name] = value
        position += length
    text = {name: value.decode("ascii").rstrip("\x00").strip() for name, value in found.items()}
    try:
        series_number = int(text["series_number"]) if text.get("series_number") else None
        instance_number = int(text["instance_number"]) if text.get("instance_number") else None
    except ValueError:
        return None  # pydicom's IS is more lenient ("1.0"): let it decide
    return InstanceHeader(
        sop_class_uid=text.get("sop_class_uid", ""),
        sop_instance_uid=text.get("sop_instance_uid", ""),
        study_uid=text.get("study_uid", ""),
        series_uid=text.get("series_uid", ""),
        transfer_syntax_uid=transfer_syntax_uid,
        modality=text.get("modality", ""),
        series_number=series_number,
        series_description=text.get("series_description", ""),
        instance_number=instance_number,
        patient_id=text.get("patient_id", ""),
    )


class _Truncated(Exception):
    pass


class WholeReads(BytesIO):
    """A buffer that refuses short reads: pydicom takes a value cut off by the end of the data
    for a complete one (a truncated UID would file the image under the wrong series). A read
    that finds nothing at all is the data set's normal end."""

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if size is not None and 0 < len(data) < size:
            # Not EOFError: pydicom catches that inside sequences and carries on.
            raise _Truncated(f"data set ends {size - len(data)} bytes inside an element")
        return data


def _str(value: object) -> str:
    return str(value).strip() if value is not None else ""


def _int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Part10File:
    """A PS3.10 file split into what its file meta says and its data set (a view, not a copy)."""

    transfer_syntax_uid: str
    media_storage_sop_class_uid: str
    media_storage_sop_instance_uid: str
    dataset: memoryview


_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def split_part10(data: bytes | memoryview) -> Part10File:
    """Read the file meta (group 0002, explicit VR little endian) of a whole Part 10 file and find where
    its data set starts, so a file that arrived whole (STOW-RS) can be stored like a C-STORE data set.
    Raises ValueError when there is no preamble, no ``DICM`` prefix or no transfer syntax."""
    view = memoryview(data)
    if len(view) < 132 or bytes(view[128:132]) != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix after the 128-byte preamble)")
    values: dict[int, str] = {}
    position = 132
    while position + 8 <= len(view):
        group, element = struct.unpack_from("<HH", view, position)
        if group != 0x0002:
            break
        vr = bytes(view[position + 4 : position + 6])
        if vr in _LONG_LENGTH_VRS:
            if position + 12 > len(view):
                raise ValueError("file meta ends inside an element")
            (length,) = struct.unpack_from("<I", view, position + 8)
            position += 12
        else:
            (length,) = struct.unpack_from("<H", view, position + 6)
            position += 8
        if position + length > len(view):
            raise ValueError("file meta ends inside an element")
        if element in (0x0002, 0x0003, 0x0010):
            values[element] = bytes(view[position : position + length]).decode("ascii", "replace").strip("\x00 ")
        position += length
    if not values.get(0x0010):
        raise ValueError("file meta has no Transfer Syntax UID")
    return Part10File(
        transfer_syntax_uid=values[0x0010],
        media_storage_sop_class_uid=values.get(0x0002, ""),
        media_storage_sop_instance_uid=values.get(0x0003, ""),
        dataset=view[position:],
    )
