"""The images' install step, replayed without Docker: the build stage's COPY lines make a
build context, its RUN line (the same pip command) installs into a fresh virtualenv, and
the final stage's ENTRYPOINT runs from it with the final stage's ENV.

Both installs run once, side by side, for the whole module. They use pip's cache (the
Dockerfiles disable it with PIP_NO_CACHE_DIR only to keep the image small), so after
`make install` they take seconds.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chart.dockerfile import Dockerfile, parse
from tests.chart.images import IMAGES, Image, install_run
from tests.chart.tools import ROOT

pytestmark = pytest.mark.timeout(900)

# What the build stage sets that must not apply here: no cache would mean downloading
# every wheel again on every run.
NOT_REPLAYED_ENV = {"PIP_NO_CACHE_DIR"}
PACKAGES = {"sidecar": ("vertex_sidecar", ROOT / "sidecar" / "vertex_sidecar"),
            "operator": ("vertex_operator", ROOT / "operator" / "vertex_operator")}


@dataclass
class Installed:
    image: Image
    dockerfile: Dockerfile
    venv: Path
    log: str

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self, home: Path) -> dict[str, str]:
        """The final stage's ENV, with the image's paths mapped to this machine."""
        env = {"PATH": os.defpath, "LANG": "C.UTF-8"}
        for key, value in self.dockerfile.final.env.items():
            value = value.replace("${PATH}", os.defpath).replace("$PATH", os.defpath)
            env[key] = value.replace(self.image_venv, str(self.venv))
        env["HOME"] = str(home)
        return env

    @property
    def image_venv(self) -> str:
        (venv,) = {c.operands[-1] for c in self.dockerfile.final.all("COPY")}
        return venv

    def run(self, *args: str, home: Path, timeout: float = 60,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        entrypoint = self.dockerfile.final.exec_form("ENTRYPOINT") or []
        env = {**self.env(home), **(extra_env or {})}
        return subprocess.run([*entrypoint, *args], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=home)


def build_context(dockerfile: Dockerfile, into: Path) -> Path:
    """What the build stage's COPY lines put into its WORKDIR (.dockerignore's exclusions applied)."""
    build = dockerfile.stages[0]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    into.mkdir(parents=True)
    for copy in build.all("COPY"):
        *sources, dest = copy.operands
        for source in sources:
            src = ROOT / source
            target = into / dest / src.name if dest.endswith("/") and not source.endswith("/") else into / dest
            if src.is_dir():
                shutil.copytree(src, target, ignore=ignore, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
    return into


def install(image: Image, base: Path) -> Installed:
    dockerfile = parse(ROOT / image.dockerfile)
    context = build_context(dockerfile, base / "context")
    venv = base / "venv"
    (image_venv,) = {c.operands[-1] for c in dockerfile.final.all("COPY")}
    command = install_run(dockerfile).replace(image_venv, str(venv))
    env = {**os.environ, **{k: v for k, v in dockerfile.stages[0].env.items() if k not in NOT_REPLAYED_ENV}}
    env.pop("VIRTUAL_ENV", None)
    # `python` is the base image's interpreter: here, the one running the tests.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=context, env=env,
                            capture_output=True, text=True, timeout=800)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{image.dockerfile}: `{command}` failed:\n{log[-4000:]}"
    return Installed(image, dockerfile, venv, log)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Installed]:
    base = tmp_path_factory.mktemp("images")
    with ThreadPoolExecutor(max_workers=len(IMAGES)) as pool:
        futures = {i.extra: pool.submit(install, i, base / i.extra) for i in IMAGES}
        return {extra: future.result() for extra, future in futures.items()}


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def third_party_imports(source: Path) -> set[str]:
    """Top-level modules a package (or one module) imports anywhere, functions too, except
    stdlib, relative imports, and imports guarded by `except ImportError` (optional on purpose)."""
    found: set[str] = set()
    for path in [source] if source.is_file() else sorted(source.rglob("*.py")):
        tree = ast.parse(path.read_text())
        optional: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    for h in node.handlers):
                optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names}


def missing_modules(installed: Installed, modules: set[str]) -> list[str]:
    code = ("import importlib.util, json, sys; "
            "print(json.dumps(sorted(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None)))")
    result = subprocess.run([str(installed.python), "-c", code, *sorted(modules)],
                            capture_output=True, text=True, timeout=60, check=True)
    return list(json.loads(result.stdout))


# ---------------------------------------------------------------- both images


@pytest.mark.parametrize("extra", [i.extra for i in IMAGES])
def test_every_import_is_installed(extra: str, installed: dict[str, Installed]) -> None:
    """The extra carries everything its package imports (also lazily, inside functions)."""
    image = installed[extra]
    own = {"vertex_sidecar", "vertex_operator"}
    package, source = PACKAGES[extra]
    needed = third_party_imports(source) - own
    if extra == "operator":  # the operator renders configs with the sidecar's schema
        for module in ("config.py", "pricing.py", "usage.py"):
            needed |= third_party_imports(ROOT / "sidecar" / "vertex_sidecar" / module) - own
    absent = missing_modules(image, needed)
    assert not absent, (
        f"pip install '.[{extra}]' lacks {absent}, which {package} imports: add their "
        f"distributions to [project.optional-dependencies].{extra} in pyproject.toml")


@pytest.mark.parametrize("extra", [i.extra for i in IMAGES])
def test_every_module_imports(extra: str, installed: dict[str, Installed], tmp_path: Path) -> None:
    package, _ = PACKAGES[extra]
    # The operator renders sidecar configs with the sidecar's own schema (and its pricing table).
    also = ["vertex_sidecar.config", "vertex_sidecar.pricing"] if extra == "operator" else []
    code = ("import importlib, pkgutil, {p}; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages({p}.__path__, '{p}.') "
            "if not m.name.endswith('.__main__')]; "
            "[importlib.import_module(m) for m in {also!r}]"
            ).format(p=package, also=also)
    image = installed[extra]
    result = subprocess.run([str(image.python), "-c", code], env=image.env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("extra", [i.extra for i in IMAGES])
def test_version(extra: str, installed: dict[str, Installed], tmp_path: Path) -> None:
    image = installed[extra]
    result = image.run("--version", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{image.image.command} 0.1.0"


# ---------------------------------------------------------------- the sidecar image


def test_sidecar_image_has_no_kubernetes_client(installed: dict[str, Installed]) -> None:
    assert missing_modules(installed["sidecar"], {"kopf", "kubernetes"}) == ["kopf", "kubernetes"]


def test_sidecar_check_config(installed: dict[str, Installed], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("listen: 127.0.0.1:4000\n"
                      "credentials: {default: {type: adc}}\n"
                      "routes:\n"
                      "  - name: gemini\n"
                      "    match: {projects: [my-proj], locations: ['*'], models: ['gemini-*']}\n"
                      "    credential: default\n")
    result = installed["sidecar"].run("--config", str(config), "--check-config", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok (1 route(s), 1 credential(s))" in result.stdout
    config.write_text("routes: [{name: x, limits: {requests_per_minute: lots}}]\n")
    assert installed["sidecar"].run("--config", str(config), "--check-config", home=tmp_path).returncode == 2


def test_sidecar_serves_and_writes_nothing(installed: dict[str, Installed], tmp_path: Path) -> None:
    """The entrypoint starts, answers /healthz and drains on SIGTERM, and the image's files
    stay as they were (a read-only root filesystem would refuse any write)."""
    image = installed["sidecar"]
    before = snapshot(image.venv)
    entrypoint = image.dockerfile.final.exec_form("ENTRYPOINT") or []
    # ADC must not reach for a real metadata server: point google-auth at a closed port.
    env = {**image.env(tmp_path), "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}
    process = subprocess.Popen([*entrypoint, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        listening = json.loads(line)
        assert listening["event"] == "listening", line
        with urllib.request.urlopen(f"http://{listening['admin_listen']}/healthz", timeout=10) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert snapshot(image.venv) == before


# ---------------------------------------------------------------- the operator image


def test_operator_help(installed: dict[str, Installed], tmp_path: Path) -> None:
    image = installed["operator"]
    result = image.run("--help", home=tmp_path)
    assert result.returncode == 0, result.stderr
    for flag in ("--standalone", "--webhook-cert", "--sidecar-image", "--liveness"):
        assert flag in result.stdout
    # Without certificates it refuses to start the webhook, and says how to fix it.
    refused = image.run("--all-namespaces", home=tmp_path)
    assert refused.returncode == 2 and "--webhook-cert" in refused.stderr
