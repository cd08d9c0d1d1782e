"""Chart values of fleet-wide limits, budgets and showback: the store reaches the operator
as flags it parses, the CA Secret is mounted where the flag points, bad values are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.chart.test_chart import _policy_args
from tests.chart.tools import CHART, RELEASE, Docs, helm, one
from vertex_operator import cli
from vertex_operator.crd import SecretKey


def _operator(docs: Docs) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def test_store_values_become_operator_flags(all_docs: Docs, tmp_path: Path) -> None:
    spec, container = _operator(all_docs)
    options = cli.options_from_args(cli.build_parser().parse_args(_policy_args(all_docs, container, tmp_path)))
    store = options.store
    assert store is not None
    assert (store.url, store.timeout_ms) == ("rediss://10.0.0.3:6378", 40)
    assert store.password_secret == SecretKey("vertex-redis", "password")
    assert options.team_label == "example.com/team"
    # The CA Secret (release namespace) is mounted read-only where the flag points.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert store.tls_ca_file == f"{mounts['store-ca']['mountPath']}/ca.crt" and mounts["store-ca"]["readOnly"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["store-ca"]["secret"] == {"secretName": "memorystore-ca",
                                             "items": [{"key": "server-ca.pem", "path": "ca.crt"}]}
    # The password itself never reaches the operator: only the Secret's name.
    assert "vertex-redis" not in str(volumes) and not any("password" in str(e) for e in container["env"])


def test_no_store_by_default(default_docs: Docs, tmp_path: Path) -> None:
    spec, container = _operator(default_docs)
    options = cli.options_from_args(cli.build_parser().parse_args(_policy_args(default_docs, container, tmp_path)))
    assert options.store is None
    assert options.team_label == "team"
    assert "store-ca" not in {v["name"] for v in spec["volumes"]}


def test_no_team_label_no_namespace_reads() -> None:
    result = helm("template", RELEASE, str(CHART), "--set", "showback.teamLabel=")
    assert "--showback-team-label" not in result.stdout
    assert "namespaces" not in result.stdout.split("kind: ClusterRole\n", 1)[1].split("---", 1)[0]


@pytest.mark.parametrize(("setting", "complaint"), [
    ("store.redis.url=redis://:hunter2@10.0.0.3:6379", "store.redis.url"),
    ("store.redis.url=http://10.0.0.3", "store.redis.url"),
    ("store.redis.timeoutMs=5000", "timeoutMs"),
    ("store.redis.passwordSecret.name=Not_A_Name", "passwordSecret"),
    ("store.redis.tls.ca=x", "tls"),
    ("showback.teamLabel=a b", "teamLabel"),
])
def test_schema_refuses_bad_store_values(setting: str, complaint: str) -> None:
    result = helm("template", RELEASE, str(CHART), "--set", setting, check=False)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr
