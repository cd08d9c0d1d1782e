"""Rendered variants of the chart, shared by the chart tests (helm runs once per variant)."""

from __future__ import annotations

import pytest

from tests.chart.tools import VARIANTS, Docs, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, Docs]:
    return {name: render(values, sets) for name, (values, sets) in VARIANTS.items()}


@pytest.fixture(scope="session")
def default_docs(rendered: dict[str, Docs]) -> Docs:
    return rendered["default"]


@pytest.fixture(scope="session")
def all_docs(rendered: dict[str, Docs]) -> Docs:
    return rendered["all-enabled"]
