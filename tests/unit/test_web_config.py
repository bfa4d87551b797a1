"""The ``[web]`` config section: defaults, and the errors an admin gets for a wrong one (with key paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, NodeConfig, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_defaults_are_off_on_loopback_without_token() -> None:
    web = NodeConfig().web
    assert (web.enabled, web.host, web.port, web.token, web.https) == (False, "127.0.0.1", 8080, "", False)


def test_the_shipped_config_documents_every_web_key() -> None:
    shipped = load_config(Path(__file__).resolve().parents[2] / "config" / "node.toml")
    assert shipped.web == NodeConfig().web


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("[web]\nport = 0", "web.port: Input should be greater than or equal to 1"),
        ("[web]\nport = 70000", "web.port: Input should be less than or equal to 65535"),
        ('[web]\nhost = " "', "web.host: host must not be empty"),
        ('[web]\ntoken = " secret "', "web.token: token must not start or end with spaces"),
        ("[web]\nenabled = true\nbogus = 1", "web.bogus: Extra inputs are not permitted"),
        ("[web]\nenabled = true\nhttps = true", "web.https = true needs tls.certificate"),
        ("[node]\nport = 8080\n[web]\nenabled = true", "web.port 8080 is the DICOM port node.port"),
    ],
)
def test_invalid_web_sections_are_named(tmp_path: Path, section: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, section))
    assert any(expected in error for error in caught.value.errors), caught.value.errors


def test_https_with_missing_certificate_file_is_an_error(tmp_path: Path) -> None:
    text = '[tls]\ncertificate = "nope.pem"\nprivate_key = "nope.key"\n[web]\nenabled = true\nhttps = true'
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert any("tls.certificate file" in error and "nope.pem" in error for error in caught.value.errors)


def test_disabled_web_is_not_checked_against_tls(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[web]\nhttps = true\ntoken = 'abc'"))
    assert config.web.https and not config.web.enabled and config.web.token == "abc"
