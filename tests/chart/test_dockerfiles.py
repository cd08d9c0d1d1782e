"""Dockerfile.sidecar and Dockerfile.operator: hadolint, plus the rules hadolint cannot know."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.chart.images import IDS, IMAGES, PYPROJECT, Image, install_run, read
from tests.chart.tools import ROOT, hadolint_path


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_hadolint(image: Image) -> None:
    result = subprocess.run([hadolint_path(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color",
                             image.dockerfile], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_multi_stage_on_a_pinned_slim_python(image: Image) -> None:
    dockerfile = read(image)
    assert len(dockerfile.stages) >= 2, "build in one stage, run in another"
    bases = {stage.base for stage in dockerfile.stages}
    assert len(bases) == 1, f"one base image for all stages (the venv is copied between them): {bases}"
    (base,) = bases
    match = re.fullmatch(r"python:(3)\.(\d+)\.(\d+)-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", base)
    assert match, f"{base}: pin a slim Python by its full version (python:3.X.Y-slim-DISTRO)"
    minimum = re.search(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert minimum and int(match.group(2)) >= int(minimum.group(1))


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_installs_only_its_extra(image: Image) -> None:
    run = install_run(read(image))
    extras = re.findall(r"\.\[([\w,-]+)\]", run)
    assert extras == [image.extra], run
    assert image.extra in PYPROJECT["project"]["optional-dependencies"]


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_runtime_stage(image: Image) -> None:
    dockerfile = read(image)
    final = dockerfile.final
    # Nothing runs while building the runtime stage: no package manager, no shell needed,
    # and only the built virtualenv comes in from the build stage.
    assert not final.all("RUN")
    copies = final.all("COPY") + final.all("ADD")
    assert copies and all(c.keyword == "COPY" and c.flags.get("from") for c in copies)
    env = final.env
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("HOME") == "/tmp", "HOME on the one writable path (read-only root filesystem)"
    (venv,) = {c.operands[-1] for c in copies}
    assert env["PATH"].startswith(f"{venv}/bin:")
    # Exec form: the runtime needs no shell; the operator's injection and the chart
    # override the command but rely on this executable being on PATH.
    assert final.exec_form("ENTRYPOINT") == [image.command]
    assert final.exec_form("CMD") is None
    assert not final.all("HEALTHCHECK"), "Kubernetes probes, not Docker health checks"
    user = final.all("USER")[-1].args
    assert re.fullmatch(r"\d+:\d+", user), f"USER {user}: numeric uid:gid (runAsNonRoot verifies it)"
    assert user == f"{image.uid}:{image.uid}" and image.uid != 0


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_oci_labels(image: Image) -> None:
    labels = read(image).final.labels
    assert labels["org.opencontainers.image.title"] == f"vertex-passthrough-{image.extra}"
    # PEP 639 `license = "SPDX"`, or the older `license = {text = "SPDX"}` table.
    license = PYPROJECT["project"]["license"]
    assert labels["org.opencontainers.image.licenses"] == (license if isinstance(license, str) else license["text"])
    for key in ("description", "version", "revision"):
        assert labels[f"org.opencontainers.image.{key}"], key


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_build_context_is_not_ignored(image: Image) -> None:
    # .dockerignore allows exactly what the build stage copies.
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    build = read(image).stages[0]
    sources = {src.rstrip("/") for copy in build.all("COPY") for src in copy.operands[:-1]}
    assert sources == allowed
    assert all((ROOT / s).exists() for s in sources)
