"""The "Cost by team" dashboard and the budget alerts against a real Prometheus scraping a
real sidecar that the webhook would have given showback env (namespace, workload, team)
and whose routes have budgets: every query runs and matches the traffic the emulator saw.

Same method as test_prometheus.py (two identical phases, evaluated exactly over the second).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import pytest

from tests.emulators.serve import create_combined_app, running_server
from tests.harness.sidecar_process import start_sidecar

from .conftest import adc_env, upstreams_for
from .test_prometheus import (
    _MISSING, DASHBOARDS, NAMESPACE, PROJECT, PROMETHEUS, PROMTOOL, RULES, SIDECAR_CONFIG, Scenario, _approx,
    _last_sample_time, alert_rules, by, expand, needs_prometheus, send_traffic, start_prometheus,
)

DASHBOARD = DASHBOARDS / "vertex-sidecar-cost.json"
GEMINI_BUDGET = 1000.0  # USD per day: a small share is used
CLAUDE_BUDGET = 1e-6  # USD per day: spent by the first request (action warn: requests go on)
SHOWBACK_ENV = {"VERTEX_SIDECAR_NAMESPACE": NAMESPACE, "VERTEX_SIDECAR_WORKLOAD": "chat",
                "VERTEX_SIDECAR_TEAM": "search"}


def config(emulator: Any) -> dict[str, Any]:
    routes = [dict(route) for route in SIDECAR_CONFIG["routes"]]
    routes[0]["budget"] = {"usd_per_day": GEMINI_BUDGET}
    routes[1]["budget"] = {"usd_per_day": CLAUDE_BUDGET, "action": "warn"}
    # No header labels: the team comes from the namespace label (showback env), as in a cluster.
    return {"upstreams": upstreams_for(emulator), "defaults": SIDECAR_CONFIG["defaults"], "routes": routes}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    if _MISSING:
        pytest.skip("needs the Debian prometheus package (prometheus, promtool)")
    assert PROMETHEUS is not None and PROMTOOL is not None, "CI must install Debian's prometheus package"
    tmp = tmp_path_factory.mktemp("cost-scenario")
    with running_server(create_combined_app(project_id=PROJECT)) as emulator:
        sidecar = start_sidecar(config(emulator), tmp, env={**adc_env(emulator), **SHOWBACK_ENV})
        prometheus = None
        try:
            prometheus = start_prometheus(tmp / "prometheus", sidecar.admin_url.removeprefix("http://"),
                                          rule_files=[RULES])
            with httpx.Client(timeout=30) as client:
                first = send_traffic(client, sidecar, "a")
                prometheus.wait_for("sum(vertex_sidecar_requests_total)", lambda v: v == first.total)
                t_first = _last_sample_time(prometheus)
                send_traffic(client, sidecar, "b")
                prometheus.wait_for("sum(vertex_sidecar_requests_total)", lambda v: v == 2 * first.total)
                t_second = _last_sample_time(prometheus)
                exposition = client.get(f"{sidecar.admin_url}/metrics").text
            yield Scenario(emulator, sidecar, prometheus, first, t_first, t_second, exposition)
        finally:
            if prometheus is not None:
                prometheus.stop()
            sidecar.terminate()


def _spent(expected_route_cost: float) -> float:
    return 2 * expected_route_cost  # both phases fall in today's budget period


@needs_prometheus
def test_every_cost_query_runs_and_matches_the_traffic(scenario: Scenario) -> None:
    expected, seconds = scenario.expected, scenario.seconds
    total = sum(expected.cost_by_model.values())
    gemini, claude = expected.cost_by_route["gemini"], expected.cost_by_route["claude"]
    assert gemini > 0 and claude > 0
    claude_requests = sum(n for (route, _), n in expected.requests.items() if route == "claude")

    def spend_close(got: dict[tuple[str, ...], float], want: dict[tuple[str, ...], float]) -> None:
        # Budgets count whole micro-dollars per request: within a micro-dollar per request.
        assert got.keys() == want.keys(), (got, want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-6 * 2 * expected.total), (key, got, want)

    checks = {
        "Spend in range (USD)": lambda r: _approx(by(r), {(): total}),
        "Spend in range by team (USD)": lambda r: _approx(by(r, "team"), {("search",): total}),
        "Spend in range by namespace (USD)": lambda r: _approx(by(r, "namespace"), {(NAMESPACE,): total}),
        "Spend in range by model (USD)": lambda r: _approx(by(r, "model"), {
            (m,): usd for m, usd in expected.cost_by_model.items()}),
        "Spend in range by workload (USD)": lambda r: _approx(by(r, "namespace", "workload"),
                                                              {(NAMESPACE, "chat"): total}),
        "Spend (USD / hour) by team": lambda r: _approx(by(r, "team"), {("search",): total / seconds * 3600}),
        "Budget spent (USD)": lambda r: spend_close(by(r, "route", "period"), {
            ("gemini", "day"): _spent(gemini), ("claude", "day"): _spent(claude)}),
        "Budget used (%)": lambda r: spend_close(
            {k: v * GEMINI_BUDGET / 100 for k, v in by(r, "route", "period").items() if k[0] == "gemini"},
            {("gemini", "day"): _spent(gemini)}) or _over(by(r, "route"), "claude", 100),
        # Every claude request of the second phase arrived with the (tiny) budget spent.
        "Requests over budget / min by action": lambda r: _approx(by(r, "route", "action"), {
            ("claude", "warn"): claude_requests / seconds * 60}),
    }
    panels = [(panel["title"], target["expr"]) for panel in json.loads(DASHBOARD.read_text())["panels"]
              for target in panel.get("targets", [])]
    assert {title for title, _ in panels} == set(checks)
    for title, expr in panels:
        result = scenario.at_end(expand(expr, scenario.window))
        assert result, f"{title!r} returned nothing: {expr}"
        checks[title](result)


def _over(values: dict[tuple[str, ...], float], route: str, threshold: float) -> None:
    assert values[(route,)] > threshold, values


@needs_prometheus
def test_cost_variables_find_the_showback_labels(scenario: Scenario) -> None:
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    found = {}
    for variable in variables:
        if variable["type"] == "query":
            metric, label = variable["query"]["query"].removeprefix("label_values(").rstrip(")").split(", ")
            found[label] = scenario.prometheus.api(f"label/{label}/values", **{"match[]": metric})
    assert found == {"team": ["search"], "namespace": [NAMESPACE]}


@needs_prometheus
def test_budget_alerts_fire_where_the_budget_is_spent(scenario: Scenario) -> None:
    firing = {}
    for rule in alert_rules():
        if rule["alert"].startswith("VertexRouteBudget"):
            firing[rule["alert"]] = {tuple(sorted(r["metric"].items())) for r in scenario.at_end(rule["expr"])}
    spent = (("namespace", NAMESPACE), ("period", "day"), ("route", "claude"))
    assert firing == {"VertexRouteBudgetSpent": {spent}, "VertexRouteBudgetNearlySpent": set()}
