"""Build the container image with podman and run it until its HEALTHCHECK passes. Slow (minutes, GBs), so it
runs only with UAD_CONTAINER_BUILD=1; deploy/container/README.md gives the full command and its knobs:

- UAD_CONTAINER_BASE: a Debian 12 image to build on. Unset: a minbase rootfs is made with mmdebstrap from the
  Debian mirror and imported into podman (no image registry is needed).
- UAD_CONTAINER_TORCH_INDEX: the TORCH_INDEX build argument (default: the Containerfile's, PyTorch's CPU index).
- UAD_CONTAINER_BUILD_FLAGS: more `podman build` arguments (e.g. -v mounts of a pip configuration).
- UAD_PODMAN_FLAGS: arguments for both `podman build` and `podman run` (e.g. --runtime runc in a sandbox).
- UAD_CONTAINER_CONTEXT: the build context (default: this repository).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "deploy" / "container" / "Containerfile"
TAG = "localhost/uad-node:container-test"

pytestmark = [
    pytest.mark.skipif(os.environ.get("UAD_CONTAINER_BUILD") != "1", reason="set UAD_CONTAINER_BUILD=1 to build"),
    pytest.mark.timeout(3600),
]


def _flags(name: str) -> list[str]:
    return shlex.split(os.environ.get(name, ""))


def _podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _base_image(tmp_path: Path) -> str:
    if os.environ.get("UAD_CONTAINER_BASE"):
        return os.environ["UAD_CONTAINER_BASE"]
    assert shutil.which("mmdebstrap"), (
        "mmdebstrap is not installed (apt-get install mmdebstrap), or set UAD_CONTAINER_BASE"
    )
    rootfs = tmp_path / "bookworm.tar"
    subprocess.run(
        ["mmdebstrap", "--variant=minbase", "bookworm", str(rootfs),
         "deb http://deb.debian.org/debian bookworm main",
         "deb http://deb.debian.org/debian bookworm-updates main",
         "deb http://deb.debian.org/debian-security bookworm-security main"],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    tag = "localhost/uad-node-base:bookworm"
    _podman("import", "--change", 'CMD ["/bin/bash"]', str(rootfs), tag)
    return tag


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    assert shutil.which("podman"), "podman is not installed (apt-get install podman buildah)"
    base = _base_image(tmp_path_factory.mktemp("base"))
    build_args = ["--build-arg", f"BASE_IMAGE={base}"]
    if os.environ.get("UAD_CONTAINER_TORCH_INDEX"):
        build_args += ["--build-arg", f"TORCH_INDEX={os.environ['UAD_CONTAINER_TORCH_INDEX']}"]
    context = os.environ.get("UAD_CONTAINER_CONTEXT", str(REPO))
    started = time.monotonic()
    _podman(
        "build", *_flags("UAD_PODMAN_FLAGS"), *_flags("UAD_CONTAINER_BUILD_FLAGS"), "--format", "docker",
        "-f", str(Path(context) / "deploy" / "container" / "Containerfile"), "-t", TAG, *build_args, context,
        timeout=3000,
    )  # fmt: skip
    size = int(_podman("image", "inspect", "--format", "{{.Size}}", TAG).stdout)
    print(f"\nbuilt {TAG} in {time.monotonic() - started:.0f} s: {size / 1e6:.0f} MB")
    return TAG


def _run(image: str, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--entrypoint", entrypoint] if entrypoint else []
    return _podman("run", "--rm", "--network", "none", *_flags("UAD_PODMAN_FLAGS"), *extra, image, *args)


def test_image_metadata(image: str) -> None:
    inspected = json.loads(_podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert "/var/lib/uad-node" in config["Volumes"]
    assert {"11112/tcp", "8080/tcp"} <= set(config["ExposedPorts"])
    # podman reports the healthcheck beside Config, docker inside it; absent from an OCI-format image.
    healthcheck = inspected.get("Healthcheck") or config.get("Healthcheck")
    assert healthcheck and any("/readyz" in part for part in healthcheck["Test"]), healthcheck


def test_image_runs_as_uid_10001_with_cpu_torch_and_a_valid_config(image: str) -> None:
    assert _run(image, "-u", entrypoint="id").stdout.strip() == "10001"
    versions = _run(
        image, "-c", "import torch; print(torch.__version__, torch.cuda.is_available())", entrypoint="python3"
    )
    assert versions.stdout.split() == ["2.13.0+cpu", "False"]
    checked = _run(image, "config", "check", "/etc/uad-node/node.toml")
    assert json.loads(checked.stdout)["web"]["enabled"] is True


def test_container_becomes_healthy_writes_its_volume_and_stops_cleanly(image: str) -> None:
    name = f"uad-node-test-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-data"
    # A private network namespace: the node listens on 0.0.0.0 inside it only; the healthcheck runs inside too.
    _podman(
        "run", "-d", "--name", name, "--network", "none", "-v", f"{volume}:/var/lib/uad-node",
        "--health-interval", "disable", *_flags("UAD_PODMAN_FLAGS"), image,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        started = time.monotonic()
        while True:
            state = _podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", _podman("logs", name, check=False).stderr[-3000:]
            if _podman("healthcheck", "run", name, check=False).returncode == 0:
                break
            assert time.monotonic() < deadline, _podman("logs", name, check=False).stderr[-3000:]
            time.sleep(3)
        print(f"\nhealthy {time.monotonic() - started:.0f} s after start")
        ls = _podman("exec", name, "ls", "-ln", "/var/lib/uad-node").stdout
        assert "uad-node.sqlite" in ls and " 10001 10001 " in ls, ls
        ready = _podman(
            "exec", name, "python3", "-c",
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/readyz').read().decode())",
        )  # fmt: skip
        assert json.loads(ready.stdout)["ready"] is True
        _podman("stop", "-t", "120", name, timeout=180)
        assert _podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        _podman("rm", "-f", name, check=False)
        _podman("volume", "rm", "-f", volume, check=False)
