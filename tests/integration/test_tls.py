"""DICOM TLS: ``uad-node serve`` with a ``[tls]`` section, against real TLS clients on loopback.

Certificates are made per test module with the openssl CLI: a throwaway CA, a server certificate
for 127.0.0.1/localhost, a client certificate from that CA, a self-signed "rogue" client, an expired
client from the CA, a client from another CA, and a second server certificate (the renewal of the
SIGHUP test).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import MRImageStorage, Verification

from node.config import TlsSection
from node.network import set_tcp_nodelay
from node.receiver.server import tls_context
from node.sender.scu import tls_client_context
from tests.integration import test_security_audit as audit
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
    expired_cert: Path
    expired_key: Path
    foreign_cert: Path
    foreign_key: Path
    renewed_server_cert: Path
    renewed_server_key: Path


def _openssl(openssl: str, folder: Path, *args: str) -> None:
    result = subprocess.run([openssl, *args], cwd=folder, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


def _signed(
    openssl: str, folder: Path, name: str, subject: str, extensions: str, serial: int, days: int = 2, ca: str = "ca"
) -> None:
    """A key, a request and a certificate signed by the test CA (or ``ca``), with the given v3 extensions;
    ``days = -1`` makes one that expired a day before it became valid, i.e. expired now."""
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(openssl, folder, "req", "-new", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
    _openssl(
        openssl, folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-set_serial", str(serial), "-days", str(days), "-extfile", f"{name}.ext", "-out", f"{name}.pem",
    )  # fmt: skip


def _ca(openssl: str, folder: Path, name: str, subject: str) -> None:
    _openssl(
        openssl, folder, "req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", subject, "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """CA, server (IP SAN 127.0.0.1, DNS SAN localhost), client from the CA, self-signed rogue client."""
    openssl = require_tool("openssl")
    folder = tmp_path_factory.mktemp("pki")
    _ca(openssl, folder, "ca", "/CN=uad-node test CA")
    _ca(openssl, folder, "other-ca", "/CN=some other CA")
    server_ext = LEAF + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n" + KEY_IDS
    client_ext = LEAF + "extendedKeyUsage=clientAuth\n" + KEY_IDS
    _signed(openssl, folder, "server", "/CN=127.0.0.1", server_ext, 2)
    _signed(openssl, folder, "client", "/CN=SCANNER1", client_ext, 3)
    _signed(openssl, folder, "expired", "/CN=SCANNER1", client_ext, 4, days=-1)
    _signed(openssl, folder, "foreign", "/CN=SCANNER1", client_ext, 5, ca="other-ca")
    _signed(openssl, folder, "server-renewed", "/CN=127.0.0.1", server_ext, 6)
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
        expired_cert=folder / "expired.pem",
        expired_key=folder / "expired.key",
        foreign_cert=folder / "foreign.pem",
        foreign_key=folder / "foreign.key",
        renewed_server_cert=folder / "server-renewed.pem",
        renewed_server_key=folder / "server-renewed.key",
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
    [ended] = audit.wait_for_events(tls_node.data_dir, "association_ended")
    assert ended[3].startswith("released: 3 stored, 0 duplicate, 0 ignored, 0 refused, "), ended
    [accepted] = audit.events(tls_node.data_dir, "association_accepted")
    assert accepted[3].startswith("called 'UADNODE', 2 of 2 presentation contexts accepted, TLSv1.3 TLS_"), accepted
    for ds in series:
        path = tls_node.data_dir / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        back = pydicom.dcmread(path)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.PixelData == ds.PixelData
        assert back.file_meta.SourceApplicationEntityTitle == "SCANNER1"
    assert len(stored_files(tls_node)) == 3


def refusals(node: NodeProcess, count: int = 1) -> list[tuple[str, str, str, str]]:
    return audit.wait_for_events(node.data_dir, "association_refused", count)


def tls11_context(certs: Certs) -> ssl.SSLContext:
    """A client that speaks TLS 1.1 at most, with a valid certificate (OpenSSL allows 1.1 at security level 0)."""
    context = client_context(certs, (certs.client_cert, certs.client_key))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("no certificate", "TLS handshake failed: peer did not return a certificate"),
        ("self-signed rogue certificate", "TLS handshake failed: client certificate rejected: self-signed certificate"),
        ("expired certificate", "TLS handshake failed: client certificate rejected: certificate has expired"),
        ("certificate from another CA",
         "TLS handshake failed: client certificate rejected: unable to get local issuer certificate"),
        ("TLS 1.1", "TLS handshake failed: unsupported protocol"),
    ],
)  # fmt: skip
def test_client_without_a_trusted_certificate_cannot_associate(
    tls_node: NodeProcess, certs: Certs, client: str, reason: str
) -> None:
    """(b, c) No client certificate, one the CA did not sign, an expired one, or TLS below 1.2: no
    association, nothing stored, and an ``association_refused`` event naming the TLS reason."""
    chains = {
        "no certificate": None,
        "self-signed rogue certificate": (certs.rogue_cert, certs.rogue_key),
        "expired certificate": (certs.expired_cert, certs.expired_key),
        "certificate from another CA": (certs.foreign_cert, certs.foreign_key),
    }
    context = tls11_context(certs) if client == "TLS 1.1" else client_context(certs, chains[client])
    started = time.monotonic()
    assoc = associate(tls_node, context)
    try:
        assert not assoc.is_established
        assert time.monotonic() - started < TIMEOUT_S  # dropped at once, not timed out
    finally:
        if assoc.is_established:
            assoc.release()
    assert stored_files(tls_node) == []
    assert refusals(tls_node) == [("association_refused", "", "127.0.0.1", reason)]
    assert f"association refused from ?@127.0.0.1: {reason}" in tls_node.log()
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
    [(_, _, _, reason)] = refusals(tls_node)
    assert reason.startswith("TLS handshake failed: "), reason
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


def test_tls_policy_tls12_gets_only_forward_secret_aead_suites(tls_node: NodeProcess, certs: Certs) -> None:
    """A TLS 1.2 client offering only a CBC suite is refused; offering everything, it gets ECDHE with AEAD."""
    context = client_context(certs, (certs.client_cert, certs.client_key))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-SHA256")
    with pytest.raises(ssl.SSLError):
        handshake(tls_node, context)
    context.set_ciphers("ALL:@SECLEVEL=0")
    version, cipher, _ = handshake(tls_node, context)
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
    [(_, _, _, reason)] = refusals(tls_node)
    assert reason == "TLS handshake failed: no shared cipher"


def handshake(node: NodeProcess, context: ssl.SSLContext) -> tuple[str, str, bytes]:
    """A bare TLS handshake with the node: (version, cipher, DER of the server certificate)."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=TIMEOUT_S) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            cipher = tls.cipher()
            assert cipher is not None and tls.version() is not None
            return str(tls.version()), cipher[0], tls.getpeercert(binary_form=True) or b""


def der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def test_sighup_rereads_the_certificate_files(node_factory, certs: Certs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """After SIGHUP new connections get the renewed certificate; a broken file is logged and the old one kept."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    shutil.copy(certs.server_cert, cert)
    shutil.copy(certs.server_key, key)
    node = node_factory(
        extra=f"""
[tls]
enabled = true
certificate = "{cert}"
private_key = "{key}"
ca_certificates = "{certs.ca}"
"""
    )
    context = client_context(certs, (certs.client_cert, certs.client_key))
    assert handshake(node, context)[2] == der(certs.server_cert)

    def hangup(expect: str, thread: bool = False) -> None:
        """SIGHUP to serve, or (``thread``) to one of its threads other than the main one, as the kernel may
        pick any thread for a process's signal: serve must not depend on which."""
        before = node.log().count(expect)
        assert node.process is not None
        if thread:
            pid = node.process.pid
            tid = next(int(t) for t in sorted(os.listdir(f"/proc/{pid}/task")) if int(t) != pid)
            assert ctypes.CDLL(None, use_errno=True).tgkill(pid, tid, signal.SIGHUP) == 0
        else:
            node.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT_S
        while node.log().count(expect) == before:
            assert time.monotonic() < deadline, node.log()[-3000:]
            time.sleep(0.05)

    cert.write_text("not a certificate\n")  # half-way through a renewal, say
    hangup("TLS files not reloaded, keeping the current ones")
    assert handshake(node, context)[2] == der(certs.server_cert)
    shutil.copy(certs.renewed_server_cert, cert)
    shutil.copy(certs.renewed_server_key, key)
    hangup("TLS certificate, key and CA files reloaded", thread=True)
    assert handshake(node, context)[2] == der(certs.renewed_server_cert)
    assert_echo_over_tls(node, certs)  # DICOM over the new certificate
    assert node.process is not None and node.process.poll() is None


def test_sender_and_receiver_contexts_share_the_policy(certs: Certs) -> None:
    """Both directions: TLS 1.2 at least; the TLS 1.2 suites are ECDHE with AES-GCM or ChaCha20-Poly1305."""
    section = TlsSection(
        enabled=True, certificate=certs.client_cert, private_key=certs.client_key, ca_certificates=certs.ca
    )
    for context in (tls_context(section), tls_client_context(section)):
        assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2
        tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12 and all(n.startswith("ECDHE-") and ("-GCM-" in n or "CHACHA20" in n) for n in tls12), tls12


@pytest.mark.parametrize("offer", ["TLS 1.1", "TLS 1.2 CBC suite"])
def test_sender_refuses_a_destination_below_the_policy(certs: Certs, offer: str) -> None:
    """The sender's context does not fall back to TLS 1.1 or to a non-AEAD suite a destination insists on."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    server.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1_1 if offer == "TLS 1.1" else ssl.TLSVersion.TLSv1_2
        server.maximum_version = ssl.TLSVersion.TLSv1_1 if offer == "TLS 1.1" else ssl.TLSVersion.TLSv1_2
    client = tls_client_context(
        TlsSection(enabled=True, certificate=certs.client_cert, private_key=certs.client_key, ca_certificates=certs.ca)
    )
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve_one() -> None:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):
                server.wrap_socket(conn, server_side=True).close()

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw, pytest.raises(ssl.SSLError):
            client.wrap_socket(raw, server_hostname="127.0.0.1")
        thread.join(TIMEOUT_S)
