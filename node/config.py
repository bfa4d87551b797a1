"""The node's one config file: a TOML document validated by pydantic.

Every other module receives the parts of :class:`NodeConfig` it needs as
arguments; nothing reads the file or the environment behind their back.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails
from sqlalchemy.engine import make_url

from models.quality import QualityThresholds
from node.jobs.config import CompletionSection, JobsSection, RetentionSection
from node.selection import SelectionSection
from node.uids import check_uids

SECRET = "***"  # what a secret reads as wherever the config is shown

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

Port = Annotated[int, Field(ge=1, le=65535)]
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _check_ae_title(value: str) -> str:
    """AE titles are 1-16 characters of the DICOM default repertoire, no backslash."""
    stripped = value.strip()
    if not stripped:
        raise ValueError("AE title must not be empty")
    if len(stripped) > 16:
        raise ValueError(f"AE title {stripped!r} is longer than 16 characters")
    if any(ch == "\\" or not (0x20 <= ord(ch) < 0x7F) for ch in stripped):
        raise ValueError(f"AE title {stripped!r} contains a backslash or a non-printable/non-ASCII character")
    return stripped


class _Section(BaseModel):
    """Base for every config section: unknown keys are errors (they are usually typos)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AllowedSender(_Section):
    """A caller that may open associations: its AE title and, optionally, where it connects from."""

    ae_title: str
    host: str = Field("", description="IP address, CIDR network or host name; empty = any address")

    _check_ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        value = value.strip()
        if value:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                if not _HOST_NAME.fullmatch(value):
                    raise ValueError(f"{value!r} is neither an IP address, a network nor a host name") from None
        return value

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """Resolve ``host`` once, at start-up, to the networks a caller may come from."""
        if not self.host:
            return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        try:
            return [ipaddress.ip_network(self.host, strict=False)]
        except ValueError:
            infos = socket.getaddrinfo(self.host, None, proto=socket.IPPROTO_TCP)
            return [ipaddress.ip_network(info[4][0]) for info in infos]


class NodeSection(_Section):
    """Identity, network and local storage of the receiving node."""

    ae_title: str = "UADNODE"
    host: str = "127.0.0.1"
    port: Port = 11112
    data_dir: Path = Field(Path("uad-data"), description="relative to the config file's folder")
    database_url: str = Field("", description="empty = SQLite file data_dir/uad-node.sqlite")
    allowed_senders: list[AllowedSender] = Field(default_factory=list)
    min_free_disk_mb: int = Field(1024, ge=0)
    max_associations: int = Field(
        10, ge=1, le=1000, description="per receiver process: with receiver_processes = N, up to N times this in all"
    )
    receiver_processes: int = Field(
        1,
        ge=1,
        le=32,
        description="1 = the DICOM receiver runs inside serve; N > 1 = N receiver processes share host:port "
        "(SO_REUSEPORT, the kernel spreads connections), for ingest beyond one Python process",
    )
    max_pdu_size: int = Field(1_048_576, ge=0, description="0 = unlimited")
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(30.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)

    _check_ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("max_pdu_size")
    @classmethod
    def _check_pdu(cls, value: int) -> int:
        if value and value < 4096:
            raise ValueError("maximum PDU size must be 0 (unlimited) or at least 4096 bytes")
        return value

    def effective_database_url(self) -> str:
        """The SQLAlchemy URL actually used: the configured one or the default SQLite file."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'uad-node.sqlite').resolve()}"


class StorageSection(_Section):
    """Which SOP classes are kept, and what happens to the rest."""

    stored_sop_classes: list[str] = Field(default_factory=lambda: [MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE])
    other_sop_classes: Literal["ignore", "reject"] = Field(
        "ignore",
        description="ignore = acknowledge and record without storing; reject = not negotiated",
    )

    @field_validator("stored_sop_classes")
    @classmethod
    def _check_uids(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("at least one SOP class must be stored")
        return check_uids(values)


# The TLS policy of both directions (receiver and sender): TLS 1.2 or 1.3 only; for TLS 1.2 only forward-secret
# AEAD suites (ECDHE with AES-GCM or ChaCha20-Poly1305, as in BCP 195 / PS3.15 B.9). TLS 1.3 suites are
# OpenSSL's own (all AEAD, all forward-secret) and are not set here.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"


class TlsSection(_Section):
    """DICOM TLS (PS3.15 B.1/B.9): the node's certificate and who it trusts."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = Field(None, description="PEM bundle used to verify client certificates")
    require_client_certificate: bool = True

    @field_validator("certificate", "private_key", "ca_certificates", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_files(self) -> TlsSection:
        if not self.enabled:
            return self
        missing = [name for name in ("certificate", "private_key") if getattr(self, name) is None]
        if self.require_client_certificate and self.ca_certificates is None:
            missing.append("ca_certificates")
        if missing:
            raise ValueError(f"TLS is enabled but {', '.join(missing)} not set")
        for name in ("certificate", "private_key", "ca_certificates"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: file {str(path)!r} does not exist")
        return self


_DIMSE_KEYS = ("ae_title", "host", "port", "tls")
_DICOMWEB_KEYS = ("url", "headers")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token


class Destination(_Section):
    """A peer that receives results (PACS, viewer, router): over DIMSE (C-STORE) or DICOMweb (STOW-RS).

    ``type = "dimse"`` (the default, so older files keep working) needs ``ae_title``, ``host`` and ``port``;
    ``type = "dicomweb"`` needs an http(s) ``url`` (the DICOMweb root: the node POSTs to ``{url}/studies``)
    and may add HTTP ``headers`` such as ``Authorization``. Keys of the other type are errors (usually a
    type left at its default)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str = ""
    host: str = ""
    port: Port | None = None
    tls: bool = False
    url: str = ""
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return _check_ae_title(value) if value.strip() else ""

    @model_validator(mode="after")
    def _check_transport(self) -> Destination:
        given = self.model_fields_set
        if self.type == "dimse":
            missing = [key for key in ("ae_title", "host", "port") if not getattr(self, key)]
            if missing:  # reported at each key, as when these keys were simply required
                errors = [InitErrorDetails(type="missing", loc=(key,), input=self.name) for key in missing]
                raise ValidationError.from_exception_data("Destination", errors)
            stray = [key for key in _DICOMWEB_KEYS if key in given]
            if stray:
                raise ValueError(f"destination {self.name!r} (type dimse): {', '.join(stray)} belong to type dicomweb")
            return self
        stray = [key for key in _DIMSE_KEYS if key in given]
        if stray:
            raise ValueError(f"destination {self.name!r} (type dicomweb): {', '.join(stray)} belong to type dimse")
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", self.url):
            raise ValueError(f"destination {self.name!r} (type dicomweb) needs an http:// or https:// url")
        for key, value in self.headers.items():
            if not _HEADER_NAME.fullmatch(key) or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
                raise ValueError(f"destination {self.name!r}: header {key!r} has an invalid name or value")
        return self

    def where(self) -> str:
        """Where results go, for logs: ``AE@host:port`` or the URL without credentials (headers never shown)."""
        if self.type == "dicomweb":
            return re.sub(r"^(https?://)[^/@]*@", r"\1", self.url)
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


class ResultsSection(_Section):
    """How results go back to PACS: the SEG, the Secondary Capture overlays and summary, and their series."""

    seg_empty_frames: Literal["keep", "omit"] = Field(
        "keep",
        description="keep = one SEG frame per source slice (OHIF/Weasis mishandle SEG that omit empty frames); "
        "omit = only frames with findings (smaller)",
    )
    seg_score_segment: bool = Field(False, description="also send the score map as a FRACTIONAL SEG (RLE)")
    max_overlay_images: int = Field(12, ge=0, le=1000, description="overlay images per series; 0 = summary only")
    seg_series_number: int = Field(9901, ge=0, le=2**31 - 1)
    overlay_series_number: int = Field(9902, ge=0, le=2**31 - 1, description="overlays and the summary image")
    structured_report: bool = Field(
        True, description="also send a TID 1500 Measurement Report SR with the anomaly volume of the SEG"
    )
    sr_series_number: int = Field(9903, ge=0, le=2**31 - 1)
    not_screened_notice: bool = Field(
        True, description="send a NOT SCREENED Secondary Capture when a selected series cannot be analysed"
    )
    notice_series_number: int = Field(9904, ge=0, le=2**31 - 1, description="the NOT SCREENED notice")
    manufacturer: str = Field("uad-node", min_length=1, max_length=64)
    institution_name: str = Field("", max_length=64, description="empty = not written")
    device_serial_number: str = Field("", max_length=64, description="empty = this machine's host name")

    @model_validator(mode="after")
    def _distinct_series(self) -> ResultsSection:
        numbers = (
            self.seg_series_number,
            self.overlay_series_number,
            self.sr_series_number,
            self.notice_series_number,
        )
        if len(set(numbers)) != len(numbers):
            raise ValueError(
                "seg_series_number, overlay_series_number, sr_series_number and notice_series_number must differ "
                "(one series, one number)"
            )
        return self


_QUALITY = QualityThresholds()


class QualitySection(_Section):
    """The quality gate between preprocessing and the model (``models.quality``): a series whose measures fall
    outside these values is not screened (a NOT SCREENED notice says why) instead of getting a confident,
    wrong answer. The defaults are set on the QC corpus of real heads and failure cases; see the README."""

    enabled: bool = Field(True, description="false = every series reaches the model (the values are still recorded)")
    min_registration_similarity: float = Field(
        _QUALITY.min_registration_similarity, ge=-1, le=1, description="correlation with the atlas anatomy"
    )
    min_mask_agreement: float = Field(
        _QUALITY.min_mask_agreement, ge=0, le=1, description="Dice of the brain mask with the registered atlas brain"
    )
    min_brain_volume_ml: float = Field(_QUALITY.min_brain_volume_ml, ge=0)
    max_brain_volume_ml: float = Field(_QUALITY.max_brain_volume_ml, gt=0)
    min_coverage: float = Field(
        _QUALITY.min_coverage, ge=0, le=1, description="fraction of the screened brain inside the field of view"
    )
    min_contrast_margin: float = Field(
        _QUALITY.min_contrast_margin, ge=-1, le=1, description="tissue order of the model's contrast, normalised units"
    )
    max_anomaly_fraction: float = Field(
        _QUALITY.max_anomaly_fraction, gt=0, le=1, description="above it the answer is a failed analysis, not a finding"
    )

    @model_validator(mode="after")
    def _ordered_volumes(self) -> QualitySection:
        if self.min_brain_volume_ml >= self.max_brain_volume_ml:
            raise ValueError("min_brain_volume_ml must be below max_brain_volume_ml")
        return self

    def thresholds(self) -> QualityThresholds:
        return QualityThresholds(**self.model_dump(exclude={"enabled"}))


class LoggingSection(_Section):
    """Log level and whether patient data may appear in logs (never, unless debugging)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_patient_data: bool = False


class WebSection(_Section):
    """The HTTP interface inside ``serve``: health, readiness, Prometheus metrics, the status page, and the
    write actions (job retry/cancel, STOW-RS) for holders of the bearer token."""

    enabled: bool = Field(False, description="true starts the HTTP interface with serve")
    host: str = "127.0.0.1"
    port: Port = 8080
    token: str = Field("", description="bearer token for write actions; empty = write actions are disabled")
    https: bool = Field(False, description="serve HTTPS with the [tls] certificate and private key")

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("host must not be empty (127.0.0.1 = this machine only, 0.0.0.0 = every interface)")
        return value

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError("token must not start or end with spaces (they are easily lost in an HTTP header)")
        return value


class NodeConfig(_Section):
    """The whole config file."""

    node: NodeSection = Field(default_factory=NodeSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    selection: SelectionSection = Field(default_factory=SelectionSection)
    tls: TlsSection = Field(default_factory=TlsSection)
    destinations: list[Destination] = Field(default_factory=list)
    results: ResultsSection = Field(default_factory=ResultsSection)
    quality: QualitySection = Field(default_factory=QualitySection)
    completion: CompletionSection = Field(default_factory=CompletionSection)
    jobs: JobsSection = Field(default_factory=JobsSection)
    retention: RetentionSection = Field(default_factory=RetentionSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    web: WebSection = Field(default_factory=WebSection)

    @model_validator(mode="after")
    def _check_web(self) -> NodeConfig:
        web = self.web
        if not web.enabled:
            return self
        if web.https:
            for name in ("certificate", "private_key"):
                path = getattr(self.tls, name)
                if path is None:
                    raise ValueError(f"web.https = true needs tls.{name} (HTTPS reuses the [tls] certificate and key)")
                if not path.is_file():
                    raise ValueError(f"web.https = true: tls.{name} file {str(path)!r} does not exist")
        if web.port == self.node.port and web.host == self.node.host:
            raise ValueError(f"web.port {web.port} is the DICOM port node.port: they must differ")
        return self

    @field_validator("destinations")
    @classmethod
    def _unique_destinations(cls, destinations: list[Destination]) -> list[Destination]:
        names = [d.name for d in destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique: {dupes}")
        return destinations

    def shown(self) -> dict[str, Any]:
        """The effective config as JSON-ready data with its secrets replaced by "***" (the web token, destination
        header values, the database password): what ``config check`` prints and a log may hold."""
        data = self.model_dump(mode="json")
        if data["web"]["token"]:
            data["web"]["token"] = SECRET
        for destination in data["destinations"]:
            destination["headers"] = dict.fromkeys(destination.get("headers") or {}, SECRET)
        if self.node.database_url:
            data["node"]["database_url"] = make_url(self.node.database_url).render_as_string(hide_password=True)
        return data


class ConfigError(Exception):
    """The config file is unreadable or invalid; ``errors`` holds one line per problem."""

    def __init__(self, path: Path, errors: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(errors))
        self.path = path
        self.errors = errors


def load_config(path: Path) -> NodeConfig:
    """Read and validate a config file; relative paths in it are relative to the file."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(path, [f"cannot read file: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(path, ["not a UTF-8 text file"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from exc
    _resolve_paths(raw, path.resolve().parent)
    try:
        return NodeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(path, [_format_error(err) for err in exc.errors()]) from exc


def _resolve_paths(raw: dict, base: Path) -> None:
    """Make file paths in the document absolute, relative to the config file's folder."""
    if isinstance(raw.get("node", {}), dict):
        raw.setdefault("node", {}).setdefault("data_dir", str(NodeSection.model_fields["data_dir"].default))
    locations = [("node", "data_dir"), ("tls", "certificate"), ("tls", "private_key"), ("tls", "ca_certificates")]
    for section, key in locations:
        table = raw.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str) and table[key]:
            table[key] = os.path.normpath(base / Path(table[key]).expanduser())
    models = raw.get("selection", {}).get("models") if isinstance(raw.get("selection"), dict) else None
    if isinstance(models, dict):
        for contrast, path in models.items():
            if isinstance(path, str) and path:
                models[contrast] = os.path.normpath(base / Path(path).expanduser())


def _format_error(err: dict) -> str:
    """One line per error, led by its dotted key path (e.g. ``destinations[0].port``)."""
    parts: list[str] = []
    for loc in err["loc"]:
        if isinstance(loc, int):
            parts[-1:] = [f"{parts[-1]}[{loc}]"] if parts else [f"[{loc}]"]
        else:
            parts.append(str(loc))
    key = ".".join(parts) or "(top level)"
    message = err["msg"].removeprefix("Value error, ")
    return f"{key}: {message}"
