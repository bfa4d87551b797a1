"""DICOM TLS: ``uad-node serve`` with a ``[tls]`` section, against real TLS clients on loopback.

Certificates are made per test module with the openssl CLI: a throwaway CA, a server certificate
for 127.0.0.1/localhost, a client certificate from that CA and a self-signed "rogue" client.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import MRImageStorage, Verification

from node.network import set_tcp_nodelay
from tests.mr_files import mr_series, write_series
from tests.peers import NodeProcess, require_tool

TIMEOUT_S = 5  # every network wait in this module: connection, ACSE, DIMSE, idle

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
LEAF = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
KEY_IDS = "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(openssl: str, folder: Path, *args: str) -> None:
    result = subprocess.run([openssl, *args], cwd=folder, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


def _signed(openssl: str, folder: Path, name: str, subject: str, extensions: str, serial: int) -> None:
    """A key, a request and a certificate signed by the test CA, with the given v3 extensions."""
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(openssl, folder, "req", "-new", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
    _openssl(
        openssl, folder, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-set_serial", str(serial), "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """CA, server (IP SAN 127.0.0.1, DNS SAN localhost), client from the CA, self-signed rogue client."""
    openssl = require_tool("openssl")
    folder = tmp_path_factory.mktemp("pki")
    _openssl(
        openssl, folder, "req", "-x509", *EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=uad-node test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    server_ext = LEAF + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n" + KEY_IDS
    _signed(openssl, folder, "server", "/CN=127.0.0.1", server_ext, 2)
    _signed(openssl, folder, "client", "/CN=SCANNER1", LEAF + "extendedKeyUsage=clientAuth\n" + KEY_IDS, 3)
    _openssl(
        openssl, folder, "req", "-x509", *EC_KEY, "-keyout", "rogue.key", "-out", "rogue.pem", "-days", "2",
        "-subj", "/CN=SCANNER1", "-addext", "extendedKeyUsage=clientAuth",
    )  # fmt: skip
    return Certs(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        rogue_cert=folder / "rogue.pem",
        rogue_key=folder / "rogue.key",
    )


@pytest.fixture
def tls_node(node_factory, certs: Certs) -> NodeProcess:  # type: ignore[no-untyped-def]
    """A node that only speaks TLS and requires a client certificate from the test CA."""
    return node_factory(
        extra=f"""
[tls]
enabled = true
certificate = "{certs.server_cert}"
private_key = "{certs.server_key}"
ca_certificates = "{certs.ca}"
require_client_certificate = true
"""
    )


def client_context(certs: Certs, chain: tuple[Path, Path] | None) -> ssl.SSLContext:
    """What a careful SCU uses: trusts only the test CA, checks the host name, presents ``chain``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs.ca))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    if chain is not None:
        context.load_cert_chain(str(chain[0]), str(chain[1]))
    return context


def associate(node: NodeProcess, context: ssl.SSLContext | None, timeout_s: float = TIMEOUT_S) -> Association:
    """An association from SCANNER1 (TLS when ``context`` is given), every wait bounded."""
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    return ae.associate(
        "127.0.0.1",
        node.port,
        ae_title=node.ae_title,
        tls_args=(context, "127.0.0.1") if context is not None else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
    )


def stored_files(node: NodeProcess) -> list[Path]:
    return sorted((node.data_dir / "studies").rglob("*.dcm"))


def assert_echo_over_tls(node: NodeProcess, certs: Certs) -> None:
    assoc = associate(node, client_context(certs, (certs.client_cert, certs.client_key)))
    assert assoc.is_established, f"a valid TLS client could not associate; node log:\n{node.log()[-3000:]}"
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_echo_and_store_over_tls(tls_node: NodeProcess, certs: Certs) -> None:
    """(a) A client with a CA-signed certificate echoes and stores over TLS; the files are on disk intact."""
    series = mr_series(3)
    assoc = associate(tls_node, client_context(certs, (certs.client_cert, certs.client_key)))
    assert assoc.is_established, tls_node.log()[-3000:]
    try:
        assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)  # really TLS, not a plain fallback
        assert assoc.dul.socket.socket.getpeercert()["subjectAltName"] == (
            ("IP Address", "127.0.0.1"),
            ("DNS", "localhost"),
        )
        assert assoc.send_c_echo().Status == 0x0000
        statuses = [int(assoc.send_c_store(ds).Status) for ds in series]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0]
    for ds in series:
        path = tls_node.data_dir / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        back = pydicom.dcmread(path)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.PixelData == ds.PixelData
        assert back.file_meta.SourceApplicationEntityTitle == "SCANNER1"
    assert len(stored_files(tls_node)) == 3


@pytest.mark.parametrize("client", ["no certificate", "self-signed rogue certificate"])
def test_client_without_a_trusted_certificate_cannot_associate(
    tls_node: NodeProcess, certs: Certs, client: str
) -> None:
    """(b, c) No client certificate, or one the CA did not sign: no association, nothing stored."""
    chain = None if client == "no certificate" else (certs.rogue_cert, certs.rogue_key)
    started = time.monotonic()
    assoc = associate(tls_node, client_context(certs, chain))
    try:
        assert not assoc.is_established
        assert time.monotonic() - started < TIMEOUT_S  # dropped at once, not timed out
    finally:
        if assoc.is_established:
            assoc.release()
    assert stored_files(tls_node) == []
    assert tls_node.process is not None and tls_node.process.poll() is None
    assert_echo_over_tls(tls_node, certs)  # the refusal did not disturb the node


def test_plain_association_to_the_tls_port_fails_and_node_keeps_serving(tls_node: NodeProcess, certs: Certs) -> None:
    """(d) A non-TLS A-ASSOCIATE-RQ gets no association; the next TLS client is served normally."""
    started = time.monotonic()
    assoc = associate(tls_node, None)
    try:
        assert not assoc.is_established
        assert not assoc.is_rejected  # the node never spoke DICOM to it: the TLS layer dropped it
        assert time.monotonic() - started < TIMEOUT_S  # dropped at once, not timed out
    finally:
        if assoc.is_established:
            assoc.release()
    assert tls_node.process is not None and tls_node.process.poll() is None
    assert_echo_over_tls(tls_node, certs)
    assoc = associate(tls_node, client_context(certs, (certs.client_cert, certs.client_key)))
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(mr_series(1)[0]).Status) == 0
    finally:
        assoc.release()
    assert len(stored_files(tls_node)) == 1


def test_silent_connection_does_not_block_other_tls_clients(tls_node: NodeProcess, certs: Certs) -> None:
    """A port probe that connects and sends nothing must not keep other senders out."""
    silent = socket.create_connection(("127.0.0.1", tls_node.port), timeout=TIMEOUT_S)
    try:
        time.sleep(0.2)  # let the node accept it and start its handshake
        # A TLS association takes milliseconds on loopback: 2 s is ample.
        assoc = associate(tls_node, client_context(certs, (certs.client_cert, certs.client_key)), timeout_s=2)
        established = assoc.is_established
        if established:
            assoc.release()
    finally:
        silent.close()  # also frees a stalled accept loop so the node can stop
    assert established


def test_dcmtk_storescu_over_tls(tls_node: NodeProcess, certs: Certs, tmp_path: Path) -> None:
    """(e) dcmtk storescu with +tls (client key/cert) and +cf (CA) stores a file over TLS."""
    storescu = require_tool("storescu")
    help_text = subprocess.run([storescu, "--help"], capture_output=True, text=True, timeout=30).stdout
    if "+tls" not in help_text:
        pytest.skip("this storescu is built without TLS support")
    [path] = write_series(mr_series(1), tmp_path / "send")
    result = subprocess.run(
        [
            storescu, "-aet", "SCANNER1", "-aec", "UADNODE",
            "-to", str(TIMEOUT_S), "-ta", str(TIMEOUT_S), "-td", str(TIMEOUT_S),
            "+tls", str(certs.client_key), str(certs.client_cert), "-pw", "+cf", str(certs.ca),
            "127.0.0.1", str(tls_node.port), str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + tls_node.log()[-3000:]
    [stored] = stored_files(tls_node)
    assert stored.stem == path.stem
    assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(path).PixelData
