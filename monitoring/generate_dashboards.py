"""Grafana dashboards for the sidecar, as code.

    .venv/bin/python monitoring/generate_dashboards.py           # (re)write the JSON files
    .venv/bin/python monitoring/generate_dashboards.py --check   # exit 1 if they are stale

Writes `charts/vertex-passthrough/files/dashboards/*.json` (checked in; the chart turns
them into ConfigMaps labelled `grafana_dashboard: "1"`). The Prometheus datasource is a
dashboard variable; uids and titles are stable so links and provisioning survive
regeneration. Every query here is run against a real Prometheus scraping a real sidecar
by tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "charts" / "vertex-passthrough" / "files" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
WIDTH = 24  # Grafana's grid width

# Selector fragments shared by the panels (Grafana expands the variables).
SCOPE = 'namespace=~"$namespace"'
REQ = f'{SCOPE}, route=~"$route", model=~"$model"'
GENAI = f'{SCOPE}, route=~"$route", gen_ai_request_model=~"$model"'
RATE = "[$__rate_interval]"


@dataclass
class Panel:
    title: str
    queries: list[tuple[str, str]]  # (expr, legend)
    kind: str = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    title: str
    panels: list[Panel]


def _variable_query(name: str, label: str, query: str, metric: str) -> dict[str, Any]:
    expression = f"label_values({metric}, {query})"
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "query": {"query": expression, "refId": f"{name}-values"}, "definition": expression,
        "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def _templating(variables: list[dict[str, Any]]) -> dict[str, Any]:
    datasource = {
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
        "current": {}, "hide": 0, "refresh": 1, "regex": "",
    }
    return {"list": [datasource, *variables]}


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i),
         "range": panel.kind == "timeseries", "instant": panel.kind != "timeseries"}
        for i, (expr, legend) in enumerate(panel.queries)
    ]
    result: dict[str, Any] = {
        "id": panel_id, "type": panel.kind, "title": panel.title, "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": targets,
    }
    if panel.description:
        result["description"] = panel.description
    if panel.kind == "timeseries":
        result["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                                                       "showPoints": "never", "spanNulls": True}
        result["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
                             "tooltip": {"mode": "multi", "sort": "desc"}}
    elif panel.kind == "stat":
        result["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                             "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    elif panel.kind == "bargauge":
        result["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                             "orientation": "horizontal", "displayMode": "gradient"}
    result["options"] = {**result.get("options", {}), **panel.options}
    return result


def dashboard(uid: str, title: str, description: str, rows: list[Row], variables: list[dict[str, Any]],
              tags: list[str]) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    panel_id, y = 1, 0
    for row in rows:
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y}, "panels": []})
        panel_id, y = panel_id + 1, y + 1
        x, row_height = 0, 0
        for panel in row.panels:
            if x + panel.width > WIDTH:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    return {
        "uid": uid, "title": title, "description": description, "tags": tags,
        "editable": True, "graphTooltip": 1, "schemaVersion": SCHEMA_VERSION, "version": 1,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s", "timezone": "",
        "templating": _templating(variables), "annotations": {"list": []}, "links": [],
        "panels": panels,
    }


def _quantiles(metric: str, selector: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}{RATE})))",
             f"p{int(q * 100)}{suffix}") for q in (0.5, 0.95, 0.99)]


def overview() -> dict[str, Any]:
    requests = f"vertex_sidecar_requests_total{{{REQ}}}"
    tokens = f'gen_ai_client_token_usage_sum{{{GENAI}, gen_ai_token_type=~"input|output"}}'
    cost = f"vertex_sidecar_cost_usd_total{{{REQ}}}"
    rows = [
        Row("Traffic", [
            Panel("Requests / s", [(f"sum(rate({requests}{RATE}))", "requests/s")], "stat", "reqps", 4, 4),
            Panel("5xx ratio", [(f'sum(rate(vertex_sidecar_requests_total{{{REQ}, code=~"5.."}}{RATE})) '
                                 f"/ sum(rate({requests}{RATE}))", "5xx")], "stat", "percentunit", 4, 4),
            Panel("429 ratio", [(f'sum(rate(vertex_sidecar_requests_total{{{REQ}, code="429"}}{RATE})) '
                                 f"/ sum(rate({requests}{RATE}))", "429")], "stat", "percentunit", 4, 4),
            Panel("Tokens / s", [(f"sum(rate({tokens}{RATE}))", "tokens/s")], "stat", "short", 4, 4),
            Panel("Cost in range (USD)", [(f"sum(increase({cost}[$__range]))", "USD")], "stat", "currencyUSD", 4, 4),
            Panel("In-flight requests", [(f"sum(vertex_sidecar_inflight_requests{{{SCOPE}}})", "in flight")],
                  "stat", "short", 4, 4),
            Panel("Requests / s by status code",
                  [(f"sum by (code) (rate({requests}{RATE}))", "{{code}}")], unit="reqps"),
            Panel("Requests / s by route and model",
                  [(f"sum by (route, model) (rate({requests}{RATE}))", "{{route}} {{model}}")], unit="reqps"),
            Panel("Requests / s by operation",
                  [(f"sum by (operation) (rate({requests}{RATE}))", "{{operation}}")], unit="reqps"),
            Panel("Upstream errors / s by reason",
                  [(f'sum by (reason) (rate(vertex_sidecar_upstream_errors_total{{{SCOPE}, route=~"$route"}}{RATE}))',
                    "{{reason}}")], unit="reqps",
                  description="Failures reaching Google (timeout, unreachable, broken stream) and 429/5xx answers."),
            Panel("Errors the sidecar answered / s by reason",
                  [(f'sum by (reason) (rate(vertex_sidecar_errors_total{{{SCOPE}, route=~"$route"}}{RATE}))',
                    "{{reason}}")], unit="reqps", width=24,
                  description="Policy refusals, invalid paths, limits, missing credentials, callers that went away."),
        ]),
        Row("Latency", [
            Panel("Request duration", _quantiles("gen_ai_server_request_duration_seconds", GENAI), unit="s",
                  description="Arrival of the request to the last byte of the response, as the sidecar sees it."),
            Panel("Time to first token (streaming) p95 by model",
                  _quantiles("gen_ai_server_time_to_first_token_seconds", GENAI, "gen_ai_request_model")[1:2],
                  unit="s"),
            Panel("Time to first token (streaming)", _quantiles("gen_ai_server_time_to_first_token_seconds", GENAI),
                  unit="s"),
            Panel("Time per output token (streaming)",
                  _quantiles("gen_ai_server_time_per_output_token_seconds", GENAI)[:2], unit="s"),
        ]),
        Row("Tokens and cost", [
            Panel("Tokens / s by type",
                  [(f"sum by (gen_ai_token_type) (rate(gen_ai_client_token_usage_sum{{{GENAI}}}{RATE}))",
                    "{{gen_ai_token_type}}")]),
            Panel("Tokens / s by model (input + output)",
                  [(f"sum by (gen_ai_request_model) (rate({tokens}{RATE}))", "{{gen_ai_request_model}}")]),
            Panel("Cost (USD / hour) by model",
                  [(f"sum by (model) (rate({cost}{RATE})) * 3600", "{{model}}")], unit="currencyUSD"),
            Panel("Cost (USD / hour) by route",
                  [(f"sum by (route) (rate({cost}{RATE})) * 3600", "{{route}}")], unit="currencyUSD"),
            Panel("Cost in range by model (USD)",
                  [(f"sort_desc(sum by (model) (increase({cost}[$__range])))", "{{model}}")],
                  "bargauge", "currencyUSD", 12, 8),
            Panel("Tokens in range by route",
                  [(f"sort_desc(sum by (route) (increase({tokens}[$__range])))", "{{route}}")],
                  "bargauge", "short", 12, 8),
        ]),
    ]
    variables = [
        _variable_query("namespace", "Namespace", "namespace", "vertex_sidecar_build_info"),
        _variable_query("route", "Route", "route", "vertex_sidecar_requests_total"),
        _variable_query("model", "Model", "model", "vertex_sidecar_requests_total"),
    ]
    return dashboard("vertex-sidecar-overview", "Vertex sidecar / Overview",
                     "Requests, errors, latency, time to first token, tokens and cost of the Vertex AI sidecars.",
                     rows, variables, ["vertex-passthrough", "gen-ai"])


def credentials() -> dict[str, Any]:
    refresh = f'vertex_sidecar_token_refresh_total{{{SCOPE}, credential=~"$credential"}}'
    rows = [
        Row("Readiness", [
            Panel("Sidecars not ready", [(f"count(vertex_sidecar_ready{{{SCOPE}}} == 0) or vector(0)", "not ready")],
                  "stat", "short", 6, 4,
                  description="A sidecar is ready once each credential its routes use has a token."),
            Panel("Sidecars", [(f"count(vertex_sidecar_ready{{{SCOPE}}})", "sidecars")], "stat", "short", 6, 4),
            Panel("Refresh failures in range", [(f'sum(increase(vertex_sidecar_token_refresh_total{{{SCOPE}, '
                                                 f'credential=~"$credential", result="failure"}}[$__range]))',
                                                 "failures")], "stat", "short", 6, 4),
            Panel("Versions", [(f"count by (version) (vertex_sidecar_build_info{{{SCOPE}}})", "{{version}}")],
                  "stat", "short", 6, 4),
        ]),
        Row("Token refreshes", [
            Panel("Token refreshes / min by credential and result",
                  [(f"sum by (credential, result) (rate({refresh}{RATE})) * 60", "{{credential}} {{result}}")],
                  unit="short", width=12),
            Panel("Refresh failures / min by credential",
                  [(f'sum by (credential) (rate(vertex_sidecar_token_refresh_total{{{SCOPE}, '
                    f'credential=~"$credential", result="failure"}}{RATE})) * 60', "{{credential}}")],
                  unit="short", width=12),
            Panel("Requests refused for want of a token / s",
                  [(f'sum by (route) (rate(vertex_sidecar_errors_total{{{SCOPE}, reason="credentials_unavailable"}}'
                    f"{RATE}))", "{{route}}")], unit="reqps", width=12,
                  description="Answered 503 by the sidecar because the route's credential had no token."),
            Panel("Config reloads / min by result",
                  [(f"sum by (result) (rate(vertex_sidecar_config_reloads_total{{{SCOPE}}}{RATE})) * 60",
                    "{{result}}")], unit="short", width=12),
        ]),
    ]
    variables = [
        _variable_query("namespace", "Namespace", "namespace", "vertex_sidecar_build_info"),
        _variable_query("credential", "Credential", "credential", "vertex_sidecar_token_refresh_total"),
    ]
    return dashboard("vertex-sidecar-credentials", "Vertex sidecar / Credentials",
                     "Google access token refreshes and failures, readiness and config reloads of the sidecars.",
                     rows, variables, ["vertex-passthrough", "gen-ai"])


def live() -> dict[str, Any]:
    scope = f'{SCOPE}, route=~"$route"'
    rows = [
        Row("Sessions", [
            Panel("Open Live sessions", [(f"sum(vertex_sidecar_live_sessions{{{scope}}})", "open")],
                  "stat", "short", 8, 4),
            Panel("Sessions started in range",
                  [(f"sum(increase(vertex_sidecar_live_sessions_started_total{{{scope}}}[$__range]))", "started")],
                  "stat", "short", 8, 4),
            Panel("Live tokens in range",
                  [(f"sum(increase(vertex_sidecar_live_tokens_total{{{scope}}}[$__range]))", "tokens")],
                  "stat", "short", 8, 4),
            Panel("Open sessions by route", [(f"sum by (route) (vertex_sidecar_live_sessions{{{scope}}})",
                                              "{{route}}")]),
            Panel("Sessions started / min by route",
                  [(f"sum by (route) (rate(vertex_sidecar_live_sessions_started_total{{{scope}}}{RATE})) * 60",
                    "{{route}}")]),
            Panel("Session duration", _quantiles("vertex_sidecar_live_session_duration_seconds", scope)[:2],
                  unit="s"),
            Panel("Turns / min by model",
                  [(f"sum by (model) (rate(vertex_sidecar_live_turns_total{{{scope}}}{RATE})) * 60", "{{model}}")]),
            Panel("Live tokens / s by type",
                  [(f"sum by (gen_ai_token_type) (rate(vertex_sidecar_live_tokens_total{{{scope}}}{RATE}))",
                    "{{gen_ai_token_type}}")], width=24),
        ]),
    ]
    variables = [
        _variable_query("namespace", "Namespace", "namespace", "vertex_sidecar_build_info"),
        _variable_query("route", "Route", "route", "vertex_sidecar_live_sessions_started_total"),
    ]
    return dashboard("vertex-sidecar-live", "Vertex sidecar / Live sessions",
                     "Live API (WebSocket) sessions relayed by the sidecars: open sessions, turns and tokens.",
                     rows, variables, ["vertex-passthrough", "gen-ai"])


def cost() -> dict[str, Any]:
    """Showback: spend per team / namespace / workload / model, and budgets used."""
    scope = 'namespace=~"$namespace", team=~"$team"'
    spend = f"vertex_sidecar_cost_usd_total{{{scope}}}"
    in_range = f"increase({spend}[$__range])"
    budget = 'namespace=~"$namespace", team=~"$team"'
    # Every sidecar of a route reports its budget and (with a store, fleet-wide) spend: max, not sum.
    spent = f"max by (namespace, route, period) (vertex_sidecar_budget_spent_usd{{{budget}}})"
    limit = f"max by (namespace, route, period) (vertex_sidecar_budget_usd{{{budget}}})"
    rows = [
        Row("Spend", [
            Panel("Spend in range (USD)", [(f"sum({in_range})", "USD")], "stat", "currencyUSD", 6, 4),
            Panel("Spend in range by team (USD)", [(f"sum by (team) ({in_range})", "{{team}}")],
                  "bargauge", "currencyUSD", 6, 8),
            Panel("Spend in range by namespace (USD)", [(f"sum by (namespace) ({in_range})", "{{namespace}}")],
                  "bargauge", "currencyUSD", 6, 8),
            Panel("Spend in range by model (USD)", [(f"sum by (model) ({in_range})", "{{model}}")],
                  "bargauge", "currencyUSD", 6, 8),
            Panel("Spend in range by workload (USD)",
                  [(f"sum by (namespace, workload) ({in_range})", "{{namespace}}/{{workload}}")],
                  "table", "currencyUSD", 12, 8),
            Panel("Spend (USD / hour) by team", [(f"sum by (team) (rate({spend}{RATE})) * 3600", "{{team}}")],
                  unit="currencyUSD"),
        ]),
        Row("Budgets", [
            Panel("Budget used (%)", [(f"100 * {spent} / {limit}", "{{namespace}}/{{route}} ({{period}})")],
                  "bargauge", "percent", 12, 8,
                  "Spend of the current UTC day or month against the route's budget (fleet-wide with a store)."),
            Panel("Budget spent (USD)", [(spent, "{{namespace}}/{{route}} ({{period}})")],
                  "table", "currencyUSD", 12, 8),
            Panel("Requests over budget / min by action",
                  [(f"sum by (namespace, route, action) (rate(vertex_sidecar_budget_exceeded_total{{{budget}}}"
                    f"{RATE})) * 60", "{{namespace}}/{{route}} {{action}}")], width=24),
        ]),
    ]
    variables = [
        _variable_query("team", "Team", "team", "vertex_sidecar_cost_usd_total"),
        _variable_query("namespace", "Namespace", "namespace", "vertex_sidecar_cost_usd_total"),
    ]
    return dashboard("vertex-sidecar-cost", "Vertex sidecar / Cost by team",
                     "Who spends on Vertex AI (list prices): per team, namespace, workload and model, and how much "
                     "of each route's budget is used.", rows, variables, ["vertex-passthrough", "gen-ai", "cost"])


DASHBOARDS = {
    "vertex-sidecar-overview.json": overview,
    "vertex-sidecar-credentials.json": credentials,
    "vertex-sidecar-live.json": live,
    "vertex-sidecar-cost.json": cost,
}


def render_all() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2, sort_keys=False) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="directory for the JSON files")
    parser.add_argument("--check", action="store_true", help="fail if the files differ from the generated ones")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render_all().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print("stale dashboards (run `make dashboards`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
