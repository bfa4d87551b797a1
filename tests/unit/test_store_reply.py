"""The node's direct C-STORE-RSP encoding must be byte-identical to pynetdicom's own."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from node.receiver.association import encode_store_reply

MR = "1.2.840.10008.5.1.4.1.1.4"


def reply(status: int, comment: str | None = None, instance: str | None = "1.2.3.4.5") -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = MR
    primitive.AffectedSOPInstanceUID = instance
    primitive.Status = status
    primitive.ErrorComment = comment
    return primitive


def pynetdicom_encoding(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    [pdata] = list(message.encode_msg(1, 16384))
    [(context_id, pdv)] = pdata.presentation_data_value_list
    assert context_id == 1 and pdv[:1] == b"\x03"
    return pdv[1:]


@pytest.mark.parametrize(
    ("status", "comment", "instance"),
    [
        (0x0000, None, "1.2.3.4.5"),  # odd-length UID: NUL padded
        (0x0000, None, "1.2.3.4.56"),
        (0xA700, "free disk space below min_free_disk_mb", "1.2.3.4.5"),
        (0xC000, "missing or invalid study_uid", "1.2.3.4.56"),
        (0xA900, "odd length!", "1.2.3.4.5"),  # odd-length comment: space padded
        (0x0000, None, None),
    ],
)
def test_direct_encoding_matches_pynetdicom(status: int, comment: str | None, instance: str | None) -> None:
    """Success and failure replies, odd and even UID/comment lengths, with and without an instance UID."""
    primitive = reply(status, comment, instance)
    assert encode_store_reply(primitive) == pynetdicom_encoding(primitive)


def test_other_messages_are_left_to_pynetdicom() -> None:
    """Requests, other services and replies naming an offending element take pynetdicom's path."""
    request = C_STORE()
    request.MessageID = 1
    assert encode_store_reply(request) is None
    assert encode_store_reply(C_ECHO()) is None
    offending = reply(0xA900)
    offending.OffendingElement = [0x00100010]
    assert encode_store_reply(offending) is None
