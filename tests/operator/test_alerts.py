"""The operator's alert rules: promtool checks and unit-tests them, and every metric they use
is one the operator exports (so a renamed metric cannot leave an alert silently dead)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vertex_operator import metrics

ALERTS = Path(__file__).resolve().parents[2] / "charts" / "vertex-passthrough" / "files" / "alerts"
RULES = ALERTS / "vertex-operator.rules.yaml"
PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"), reason="needs promtool (Debian package prometheus)")
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    assert PROMTOOL is not None, "promtool is missing in CI"
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([PROMTOOL, "test", "rules", "vertex-operator.rules.test.yaml"], cwd=ALERTS,
                          capture_output=True, text=True, timeout=120)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_every_alert_uses_metrics_the_operator_exports() -> None:
    exported = set()
    for family in metrics.REGISTRY.collect():
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
    exported |= {f"{name}_total" for name in exported} | {f"{name}_bucket" for name in exported}
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"VertexOperatorWebhookErrors", "VertexOperatorNoLeader",
                                           "VertexPodsWithoutSidecar"}
    for rule in rules:
        used = set(re.findall(r"\b(vertex_operator_[a-z_]+)", rule["expr"]))
        assert used and used <= exported, (rule["alert"], used - exported)
