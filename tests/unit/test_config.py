"""The config file: the shipped one, defaults, path resolution and every way a bad file is reported.

CLI cases run the real ``uad-node`` (``python -m node``) as subprocesses; they are started together
by one module fixture so the whole file stays fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from models.quality import QualityThresholds
from node.config import ConfigError, QualitySection, load_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "node.toml"
MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"

DEST = '[[destinations]]\nname = "{name}"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {port}\n'


@dataclass(frozen=True)
class BadFile:
    """A bad config file and the error line ``config check`` must print for it."""

    content: str | bytes | None  # None: the file does not exist
    line_start: str | None  # the stderr error line starts with this (after the indent); None: not pinned
    fragments: tuple[str, ...] = ()


BAD_FILES: dict[str, BadFile] = {
    "port-out-of-range": BadFile("[node]\nport = 70000\n", "node.port: ", ("65535",)),
    "ae-title-too-long": BadFile('[node]\nae_title = "ABCDEFGHIJKLMNOPQ"\n', "node.ae_title: ", ("16",)),
    "ae-title-backslash": BadFile("[node]\nae_title = 'AB\\CD'\n", "node.ae_title: ", ("backslash",)),
    "unknown-key": BadFile("[node]\nprot = 11112\n", "node.prot: ", ("Extra inputs",)),
    "destination-port-missing": BadFile(
        DEST.format(name="a", port=104) + '[[destinations]]\nname = "b"\nae_title = "PACS"\nhost = "h"\n',
        "destinations[1].port: ",
        ("required",),
    ),
    "duplicate-destination-names": BadFile(
        DEST.format(name="pacs", port=104) + DEST.format(name="pacs", port=105),
        None,
        ("destination names must be unique", "pacs"),
    ),
    "invalid-stored-sop-class": BadFile(
        f'[storage]\nstored_sop_classes = ["{MR}", "1.2.x"]\n', "storage.stored_sop_classes: ", ("1.2.x",)
    ),
    "tls-without-files": BadFile("[tls]\nenabled = true\n", "tls: ", ("certificate", "private_key", "ca_certificates")),
    "tls-certificate-missing": BadFile(
        '[tls]\nenabled = true\ncertificate = "no-such-cert.pem"\nprivate_key = "key.pem"\n'
        'ca_certificates = "ca.pem"\n',
        "tls: ",
        ("certificate", "no-such-cert.pem", "does not exist"),
    ),
    "max-pdu-too-small": BadFile("[node]\nmax_pdu_size = 100\n", "node.max_pdu_size: ", ("4096",)),
    "not-toml": BadFile("[node\nport = \n", "not valid TOML", ()),
    "missing-file": BadFile(None, "cannot read file", ("No such file",)),
    "not-utf8": BadFile(b"\x89PNG\r\n\x1a\n\xff\xfe[node]\n", None, ()),
}

MULTI_ERROR = (
    '[node]\nport = 70000\nae_title = "ABCDEFGHIJKLMNOPQ"\nmax_pdu_size = 100\n[storage]\nother_sop_classes = "maybe"\n'
)
MULTI_ERROR_KEYS = ["node.port", "node.ae_title", "node.max_pdu_size", "storage.other_sop_classes"]


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Run every ``uad-node config check`` of this module in parallel; name -> (file, result)."""
    root = tmp_path_factory.mktemp("configs")
    files: dict[str, Path] = {"shipped": Path("config/node.toml")}  # relative, as a user types it
    for name, case in BAD_FILES.items():
        folder = root / name
        folder.mkdir()
        _write(folder / "key.pem", "not checked here\n")
        _write(folder / "ca.pem", "not checked here\n")
        path = folder / "node.toml"
        if case.content is not None:
            _write(path, case.content)
        files[name] = path
    files["multi-error"] = _write(root / "multi" / "node.toml", MULTI_ERROR)

    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "node", "config", "check", str(path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, path in files.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        results[name] = (files[name], subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_shipped_config_loads_and_validates() -> None:
    """The file shipped in the repository is valid and says what its comments say."""
    config = load_config(SHIPPED)
    assert config.node.ae_title == "UADNODE"
    assert config.node.port == 11112
    assert config.node.data_dir.resolve() == REPO / "uad-data"  # "../uad-data" from config/
    assert config.node.effective_database_url() == f"sqlite:///{REPO / 'uad-data' / 'uad-node.sqlite'}"
    assert [(s.ae_title, s.host) for s in config.node.allowed_senders] == [("SCANNER1", "127.0.0.1")]
    assert config.storage.stored_sop_classes == [MR, ENHANCED_MR]
    assert config.tls.enabled is False and config.tls.certificate is None
    assert [(d.name, d.ae_title, d.port) for d in config.destinations] == [("pacs", "ORTHANC", 4242)]


def test_cli_check_of_shipped_config_prints_effective_json(cli_runs) -> None:
    """``uad-node config check config/node.toml`` exits 0 and prints the effective config as JSON."""
    _, result = cli_runs["shipped"]
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["node"]["ae_title"] == "UADNODE"
    assert effective["node"]["port"] == 11112
    assert Path(effective["node"]["data_dir"]).is_absolute()
    assert result.stderr.strip().endswith("OK")


@pytest.mark.parametrize(
    ("data_dir", "expected"),
    [
        ("../data", "data"),
        ("data", "etc/data"),
        ("./sub/../data2", "etc/data2"),
    ],
)
def test_relative_data_dir_is_relative_to_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: str, expected: str
) -> None:
    """A relative data_dir means the config file's folder, whatever the working directory is."""
    _write(tmp_path / "etc" / "node.toml", f'[node]\ndata_dir = "{data_dir}"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "etc" / "node.toml")
    assert config.node.data_dir.resolve() == (tmp_path / expected).resolve()
    assert config.node.data_dir.is_absolute()


def test_absolute_data_dir_is_kept(tmp_path: Path) -> None:
    """An absolute data_dir is used as written, not re-rooted under the config folder."""
    target = tmp_path / "abs" / "data"
    config = load_config(_write(tmp_path / "etc" / "node.toml", f"[node]\ndata_dir = '{target}'\n"))
    assert config.node.data_dir == target


def test_minimal_file_gets_documented_defaults(tmp_path: Path) -> None:
    """A file with only ``[node] port`` gets the defaults the shipped file documents."""
    config = load_config(_write(tmp_path / "node.toml", "[node]\nport = 4000\n"))
    assert config.node.port == 4000
    assert config.node.ae_title == "UADNODE"
    assert config.storage.stored_sop_classes == [MR, ENHANCED_MR]
    assert config.storage.other_sop_classes == "ignore"
    assert config.node.max_associations == 10
    assert config.node.max_pdu_size == 1_048_576
    assert config.node.allowed_senders == []
    assert config.tls.enabled is False
    assert config.destinations == []
    assert config.logging.level == "INFO" and config.logging.log_patient_data is False


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_exits_2_with_key_path_on_stderr(cli_runs, name: str) -> None:
    """Each bad file: exit 2, nothing on stdout, no traceback, one error line led by its key path."""
    case = BAD_FILES[name]
    path, result = cli_runs[name]
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}: invalid config"
    errors = [line.strip() for line in lines[1:]]
    assert len(errors) == 1, errors
    if case.line_start is not None:
        assert errors[0].startswith(case.line_start), errors
    for fragment in case.fragments:
        assert fragment in errors[0], errors


def test_all_errors_in_one_file_are_reported_one_per_line(cli_runs) -> None:
    """Several mistakes in one file are all listed, one line each, so one run finds them all."""
    _, result = cli_runs["multi-error"]
    assert result.returncode == 2
    errors = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert sorted(e.split(": ", 1)[0] for e in errors) == sorted(MULTI_ERROR_KEYS), errors


def test_config_error_lists_errors_for_callers(tmp_path: Path) -> None:
    """``load_config`` raises ConfigError carrying the path and one entry per problem."""
    path = _write(tmp_path / "node.toml", MULTI_ERROR)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == path
    assert len(info.value.errors) == len(MULTI_ERROR_KEYS)


def _sender_config(tmp_path: Path, host: str) -> Path:
    sender = f"{{ ae_title = \"SCANNER1\", host = '{host}' }}"
    return _write(tmp_path / "node.toml", f"[node]\nallowed_senders = [{sender}]\n")


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "10.0.0.0/8",
        "pacs-01.example",
        "pacs01.example",
        "localhost",
        "::1",
        "fd00::/8",
        "",
    ],
)
def test_allowed_sender_host_accepts_addresses_networks_and_names(tmp_path: Path, host: str) -> None:
    """An IP address, a CIDR network, a host name (or empty = anywhere) is a valid sender host."""
    config = load_config(_sender_config(tmp_path, host))
    assert config.node.allowed_senders[0].host == host


@pytest.mark.parametrize(
    "host",
    [
        "bad host!",
        "bad host",
        "pacs..example",
    ],
)
def test_allowed_sender_host_rejects_garbage(tmp_path: Path, host: str) -> None:
    """A sender host that is neither address, network nor host name is a config error at its key path."""
    with pytest.raises(ConfigError) as info:
        load_config(_sender_config(tmp_path, host))
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith("node.allowed_senders[0].host: ")


def test_orthanc_routing_example_halves_agree() -> None:
    """deploy/orthanc: the node half loads, and Orthanc's entry for the node names the node's AE title and
    port while the node accepts Orthanc and sends back to the AE title Orthanc answers to."""
    node = load_config(REPO / "deploy" / "orthanc" / "node.toml")
    text = (REPO / "deploy" / "orthanc" / "orthanc.json").read_text()
    orthanc = json.loads("\n".join(line for line in text.splitlines() if not line.strip().startswith("//")))
    ae_title, _, port = orthanc["DicomModalities"]["uadnode"]
    assert (ae_title, port) == (node.node.ae_title, node.node.port)
    assert [s.ae_title for s in node.node.allowed_senders] == [orthanc["DicomAet"]]
    assert [d.ae_title for d in node.destinations] == [orthanc["DicomAet"]]
    assert orthanc["LuaScripts"][0].endswith("/uad-node-routing.lua")


def test_quality_section_defaults_shipped_file_and_errors(tmp_path: Path) -> None:
    shipped = load_config(REPO / "config" / "node.toml").quality
    assert shipped == QualitySection() and shipped.enabled is True
    assert shipped.thresholds() == QualityThresholds()  # the documented defaults are the gate's own
    for bad, key in (
        ("min_coverage = 1.5", "quality.min_coverage"),
        ("max_anomaly_fraction = 0", "quality.max_anomaly_fraction"),
        ("min_brain_volume_ml = 3000", "quality: min_brain_volume_ml must be below max_brain_volume_ml"),
        ("min_similarity = 0.5", "quality.min_similarity"),  # a typo is an error, not a silent default
    ):
        path = tmp_path / "node.toml"
        path.write_text(f"[quality]\n{bad}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert any(error.startswith(key) for error in info.value.errors), info.value.errors


def test_config_check_masks_the_secrets(tmp_path: Path) -> None:
    """The printed config may end up in a ticket or a log: the web token, header values and the database password
    read "***", everything else as given."""
    _write(
        tmp_path / "node.toml",
        '[node]\ndatabase_url = "postgresql+psycopg://uad:s3cret@127.0.0.1:5432/uad"\n'
        '[web]\ntoken = "t0ken"\n'
        '[[destinations]]\nname = "web"\ntype = "dicomweb"\nurl = "http://127.0.0.1:8042/dicom-web"\n'
        'headers = { Authorization = "Bearer b3arer" }\n',
    )
    config = load_config(tmp_path / "node.toml")
    text = json.dumps(config.shown())  # what `config check` prints
    for secret in ("s3cret", "t0ken", "b3arer"):
        assert secret not in text
    shown = json.loads(text)
    assert shown["node"]["database_url"] == "postgresql+psycopg://uad:***@127.0.0.1:5432/uad"
    assert shown["web"]["token"] == "***"
    assert shown["destinations"][0]["headers"] == {"Authorization": "***"}
    assert shown["destinations"][0]["url"] == "http://127.0.0.1:8042/dicom-web"
    assert config.web.token == "t0ken"  # the config itself keeps them
