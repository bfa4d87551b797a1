"""What a STOW-RS answer means for each instance (node/dicomweb/stow_client.py), the batching of a send,
and the ``type = "dicomweb"`` destination config. Answers are real PS3.18 bodies (the node's receiver
writes the same ones) and Orthanc's own shape (no Content-Type on a 400); the network side is in
tests/integration/test_dicomweb.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, Destination, load_config
from node.dicomweb.stow_client import MAX_BATCH_INSTANCES, batches, judge_response
from node.dicomweb.stow_status import InstanceStatus, response_body
from node.sender.outcomes import DeliveryState
from node.sender.scu import FileHeader

MR = "1.2.840.10008.5.1.4.1.1.4"
DICOM_JSON = "application/dicom+json"
# Orthanc 1.10's answer to a body it cannot parse: 400, no Content-Type, empty sequences.
ORTHANC_400 = b'{"00080005":{"Value":["ISO_IR 100"],"vr":"CS"},"00081198":{"vr":"SQ"},"00081199":{"vr":"SQ"}}'


def test_202_judges_each_instance_by_its_own_reason() -> None:
    body = response_body(
        [
            InstanceStatus(MR, "1.2.3.1"),
            InstanceStatus(MR, "1.2.3.2", failure_reason=0xC000),  # cannot understand: permanent
            InstanceStatus(MR, "1.2.3.3", failure_reason=0xA700),  # out of resources: try again later
            InstanceStatus(MR, "1.2.3.4", warning_reason=0xB000),
        ]
    )
    judge = judge_response(202, DICOM_JSON, body)
    outcomes = {uid: judge(uid) for uid in ("1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4", "1.2.3.5")}
    states = {uid: (o.verdict.state, o.status) for uid, o in outcomes.items()}
    assert states == {
        "1.2.3.1": (DeliveryState.DELIVERED, 0),
        "1.2.3.2": (DeliveryState.FAILED_PERMANENT, 0xC000),
        "1.2.3.3": (DeliveryState.FAILED_TRANSIENT, 0xA700),
        "1.2.3.4": (DeliveryState.DELIVERED, 0xB000),
        "1.2.3.5": (DeliveryState.FAILED_TRANSIENT, None),  # not mentioned: resending is harmless
    }
    assert "0xC000" in outcomes["1.2.3.2"].verdict.reason
    assert "warning 0xB000" in outcomes["1.2.3.4"].verdict.reason


def test_409_with_sop_class_not_supported_is_permanent() -> None:
    body = response_body([InstanceStatus("1.2.840.10008.5.1.4.1.1.7", "1.2.3.9", failure_reason=0x0122)])
    outcome = judge_response(409, DICOM_JSON, body)("1.2.3.9")
    assert (outcome.verdict.state, outcome.status) == (DeliveryState.FAILED_PERMANENT, 0x0122)


@pytest.mark.parametrize(
    ("status", "content_type", "body", "state", "words"),
    [
        (200, "", b"", DeliveryState.DELIVERED, ""),
        (400, "", ORTHANC_400, DeliveryState.FAILED_PERMANENT, "HTTP 400"),
        (401, "text/plain", b"no", DeliveryState.FAILED_PERMANENT, "not authorized"),
        (404, "text/html", b"<html/>", DeliveryState.FAILED_PERMANENT, "check the url"),
        (301, "", b"", DeliveryState.FAILED_PERMANENT, "redirect"),
        (408, "", b"", DeliveryState.FAILED_TRANSIENT, "HTTP 408"),
        (429, "", b"", DeliveryState.FAILED_TRANSIENT, "too many requests"),
        (500, DICOM_JSON, b"not json", DeliveryState.FAILED_TRANSIENT, "HTTP 500"),
        (503, "", b"", DeliveryState.FAILED_TRANSIENT, "service unavailable"),
    ],
)
def test_the_http_status_decides_for_instances_the_body_does_not_name(
    status: int, content_type: str, body: bytes, state: DeliveryState, words: str
) -> None:
    outcome = judge_response(status, content_type, body, "web")("1.2.3.1")
    assert outcome.verdict.state is state
    assert words in outcome.verdict.reason


def test_batches_respect_the_instance_limit_and_keep_order(tmp_path: Path) -> None:
    headers = []
    for index in range(2 * MAX_BATCH_INSTANCES + 7):
        path = tmp_path / f"{index}.dcm"
        path.write_bytes(b"x" * 10)
        headers.append(FileHeader(path, MR, f"1.2.3.{index}", "1.2.4", "1.2.840.10008.1.2.1"))
    split = list(batches(headers))
    assert [len(b) for b in split] == [MAX_BATCH_INSTANCES, MAX_BATCH_INSTANCES, 7]
    assert [h for b in split for h in b] == headers


def test_dicomweb_destination_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        '[[destinations]]\nname = "web"\ntype = "dicomweb"\nurl = "https://user:secret@pacs.example/dicom-web/"\n'
        'headers = { Authorization = "Bearer abc" }\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
    )
    web, pacs = load_config(path).destinations
    assert (web.type, web.headers, pacs.type) == ("dicomweb", {"Authorization": "Bearer abc"}, "dimse")
    assert web.where() == "https://pacs.example/dicom-web/"  # no credentials in logs
    assert pacs.where() == "PACS@127.0.0.1:104"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('type = "dicomweb"', "destinations[0]: destination 'd' (type dicomweb) needs an http:// or https:// url"),
        ('type = "dicomweb"\nurl = "ftp://x/y"', "needs an http:// or https:// url"),
        ('type = "dicomweb"\nurl = "http://x"\nport = 104', "(type dicomweb): port belong to type dimse"),
        ('ae_title = "P"\nhost = "h"\nport = 1\nurl = "http://x"', "(type dimse): url belong to type dicomweb"),
        ('type = "dicomweb"\nurl = "http://x"\nheaders = { "a b" = "c" }', "header 'a b' has an invalid name"),
        ('type = "dicomweb"\nurl = "http://x"\nheaders = { A = "x\\ny" }', "header 'A' has an invalid name or value"),
        ('type = "stow"\nurl = "http://x"', "destinations[0].type: Input should be 'dimse' or 'dicomweb'"),
        ('ae_title = "P"', "destinations[0].host: Field required"),
    ],
)
def test_destination_errors_are_one_clear_line(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f'[[destinations]]\nname = "d"\n{table}\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert any(message in line and "\n" not in line for line in caught.value.errors), caught.value.errors


def test_old_dimse_destination_keeps_working_without_a_type() -> None:
    dest = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242)
    assert (dest.type, dest.url, dest.headers) == ("dimse", "", {})
