"""The two images the project builds, and what each must agree with."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass

import yaml

from tests.chart.dockerfile import Dockerfile, parse
from tests.chart.tools import CHART, ROOT
from vertex_operator.inject import SIDECAR_UID

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Image:
    dockerfile: str
    extra: str        # the one optional-dependency group installed
    command: str      # the console script the image runs
    uid: int          # must match what runs it (operator's sidecar securityContext / chart)


CHART_UID = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]["podSecurityContext"]["runAsUser"]
IMAGES = [
    Image("Dockerfile.sidecar", "sidecar", "vertex-sidecar", SIDECAR_UID),
    Image("Dockerfile.operator", "operator", "vertex-operator", CHART_UID),
]
IDS = [i.dockerfile for i in IMAGES]


def read(image: Image) -> Dockerfile:
    return parse(ROOT / image.dockerfile)


def install_run(dockerfile: Dockerfile) -> str:
    """The build stage's RUN that pip-installs the project."""
    (run,) = [r.args for s in dockerfile.stages[:-1] for r in s.all("RUN") if "pip install" in r.args]
    return run
