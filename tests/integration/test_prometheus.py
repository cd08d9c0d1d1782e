"""A real Prometheus scrapes a real sidecar serving known traffic from the emulators.

Every dashboard query and alert expression is then evaluated by that Prometheus and the
numbers are compared with what the emulator reported (tokens, request counts). The same
traffic is sent twice, with a scrape in between: evaluating at the second scrape over a
window that starts exactly at the first one makes `rate()`/`increase()` exact (Prometheus
2.x range selectors include their start, so nothing is extrapolated).

Needs the Debian `prometheus` package (prometheus + promtool); skipped without it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import yaml

from tests.emulators.serve import ServerHandle, create_combined_app, running_server
from tests.harness.sidecar_process import SidecarProcess, start_sidecar
from vertex_sidecar.pricing import PricingTable
from vertex_sidecar.usage import Usage

from .conftest import adc_env, upstreams_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "charts" / "vertex-passthrough" / "files" / "dashboards"
ALERTS = ROOT / "charts" / "vertex-passthrough" / "files" / "alerts"
RULES = ALERTS / "vertex-sidecar.rules.yaml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
# Locally a missing Prometheus skips these tests; in CI (`CI` set) .ci/run installs it, so
# they run and a missing binary fails them instead of silently skipping.
_MISSING = (PROMETHEUS is None or PROMTOOL is None) and not os.environ.get("CI")
needs_prometheus = pytest.mark.skipif(_MISSING, reason="needs the Debian prometheus package (prometheus, promtool)")

PROJECT, LOCATION = "emu-project", "us-central1"
NAMESPACE, POD = "test-ns", "test-pod"
SIDECAR_CONFIG: dict[str, Any] = {
    "defaults": {"project": PROJECT, "location": LOCATION},
    "routes": [
        {"name": "gemini", "match": {"models": ["gemini-*"]}},
        {"name": "claude", "match": {"models": ["claude-*"]}},
        {"name": "rest", "match": {"models": ["*"]}},
    ],
    "metrics": {"header_labels": {"x-team": "team"}},
}


# ----------------------------------------------------------------------------- Prometheus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrometheusProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def api(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        result = self.query(expr, at)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, predicate: Callable[[float | None], bool], timeout: float = 20.0) -> float | None:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.scalar(expr)
            if predicate(value):
                return value
            time.sleep(0.1)
        raise AssertionError(f"{expr} never satisfied the condition; last value {value}\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_prometheus(workdir: Path, target: str, *, rule_files: list[Path] = (),  # type: ignore[assignment]
                     scrape_interval: str = "1s", labels: dict[str, str] | None = None) -> PrometheusProcess:
    """Prometheus on a free loopback port scraping `target` (host:port of /metrics)."""
    assert PROMETHEUS is not None
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                   "evaluation_interval": scrape_interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": "vertex-sidecar", "static_configs": [
            {"targets": [target], "labels": labels or {"namespace": NAMESPACE, "pod": POD}}]}],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    last_error = ""
    for _ in range(5):  # the probed port may be taken by someone else in between
        port = free_port()
        log_path = workdir / f"prometheus-{port}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
                 "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        prometheus = PrometheusProcess(proc, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{prometheus.url}/-/ready", timeout=1).status_code == 200:
                    return prometheus
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        prometheus.stop()
        last_error = log_path.read_text()
    raise RuntimeError(f"prometheus did not start:\n{last_error}")


# ------------------------------------------------------------------------------ traffic


@dataclass
class Expected:
    """What the emulator reported for the traffic of one phase."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (route, code)
    tokens: Counter[str] = field(default_factory=Counter)  # token type
    tokens_by_model: Counter[str] = field(default_factory=Counter)  # input + output
    tokens_by_route: Counter[str] = field(default_factory=Counter)
    cost_by_model: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    cost_by_route: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    usage_responses: int = 0
    streaming_ok: int = 0
    log_tokens: dict[str, dict[str, int]] = field(default_factory=dict)  # request id → tokens

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def add_usage(self, request_id: str, route: str, model_label: str, priced_model: str, usage: Usage) -> None:
        self.usage_responses += 1
        self.tokens["input"] += usage.input_tokens
        self.tokens["output"] += usage.output_tokens
        if usage.cached_input_tokens:
            self.tokens["cached_input"] += usage.cached_input_tokens
        if usage.reasoning_tokens:
            self.tokens["reasoning"] += usage.reasoning_tokens
        self.tokens_by_model[model_label] += usage.input_tokens + usage.output_tokens
        self.tokens_by_route[route] += usage.input_tokens + usage.output_tokens
        cost = PricingTable.default().cost(priced_model, usage).usd
        self.cost_by_model[model_label] += cost
        self.cost_by_route[route] += cost
        self.log_tokens[request_id] = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}


def gemini_usage(meta: dict[str, Any]) -> Usage:
    thoughts = meta.get("thoughtsTokenCount", 0)
    return Usage(input_tokens=meta["promptTokenCount"], output_tokens=meta["candidatesTokenCount"] + thoughts,
                 cached_input_tokens=meta.get("cachedContentTokenCount", 0), reasoning_tokens=thoughts,
                 total_tokens=meta["totalTokenCount"], found=True)


def sse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and "[DONE]" not in line]


def send_traffic(client: httpx.Client, sidecar: SidecarProcess, phase: str) -> Expected:
    """One phase of known traffic; returns what the emulator reported for it."""
    expected = Expected()
    base = f"{sidecar.base_url}/v1/projects/{PROJECT}/locations/{LOCATION}"
    counter = iter(range(1000))

    def post(path: str, body: dict[str, Any], route: str, **headers: str) -> tuple[str, httpx.Response]:
        request_id = f"{phase}-{next(counter)}"
        response = client.post(f"{base}/{path}", json=body, headers={"x-request-id": request_id, **headers})
        expected.requests[(route, str(response.status_code))] += 1
        return request_id, response

    prompt = {"contents": [{"role": "user", "parts": [{"text": "count the words of this prompt please"}]}]}
    for _ in range(3):
        rid, r = post("publishers/google/models/gemini-2.5-flash:generateContent", prompt, "gemini",
                      **{"x-team": "search", "tags": "exp-1, prod"})
        assert r.status_code == 200, r.text
        expected.add_usage(rid, "gemini", "gemini-2.5-flash", "gemini-2.5-flash",
                           gemini_usage(r.json()["usageMetadata"]))
    for _ in range(2):
        rid, r = post("publishers/google/models/gemini-2.0-flash-001:streamGenerateContent?alt=sse", prompt, "gemini",
                      **{"x-emulator-chunks": "3"})
        assert r.status_code == 200, r.text
        meta = [e["usageMetadata"] for e in sse_events(r.text) if "promptTokenCount" in e.get("usageMetadata", {})]
        expected.add_usage(rid, "gemini", "gemini-2.0-flash", "gemini-2.0-flash-001", gemini_usage(meta[-1]))
        expected.streaming_ok += 1
    rid, r = post("publishers/google/models/gemini-2.5-flash:streamGenerateContent", prompt, "gemini")
    assert r.status_code == 200, r.text
    expected.add_usage(rid, "gemini", "gemini-2.5-flash", "gemini-2.5-flash",
                       gemini_usage(r.json()[-1]["usageMetadata"]))
    expected.streaming_ok += 1
    rid, r = post("publishers/google/models/gemini-2.5-flash:countTokens", prompt, "gemini")
    assert r.status_code == 200 and r.json()["totalTokens"] > 0, r.text  # free: logged, not counted

    claude = {"anthropic_version": "vertex-2023-10-16", "max_tokens": 64,
              "messages": [{"role": "user", "content": "hello claude how are you today"}]}
    rid, r = post("publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict", claude, "claude")
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    expected.add_usage(rid, "claude", "claude-sonnet-4-5", "claude-sonnet-4-5@20250929", Usage(
        input_tokens=u["input_tokens"], output_tokens=u["output_tokens"], found=True))
    rid, r = post("publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict", {**claude, "stream": True},
                  "claude")
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    start = next(e for e in events if e["type"] == "message_start")["message"]["usage"]
    delta = [e for e in events if e["type"] == "message_delta"][-1]["usage"]
    expected.add_usage(rid, "claude", "claude-sonnet-4-5", "claude-sonnet-4-5@20250929", Usage(
        input_tokens=start["input_tokens"], output_tokens=delta["output_tokens"], found=True))
    expected.streaming_ok += 1

    # the OpenAI-compatible endpoint: the sidecar routes it by the model named in the body
    rid, r = post("endpoints/openapi/chat/completions", {"model": "google/gemini-2.0-flash-001", "messages": [
        {"role": "user", "content": "what is the capital of France"}]}, "gemini")
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    expected.add_usage(rid, "gemini", "gemini-2.0-flash", "gemini-2.0-flash-001", Usage(
        input_tokens=u["prompt_tokens"], output_tokens=u["completion_tokens"], found=True))

    for code in (503, 429):  # Google's errors, relayed
        _, r = post(f"publishers/google/models/error-{code}:generateContent", prompt, "rest")
        assert r.status_code == code, r.text
    r = client.post(f"{sidecar.base_url}/v1/projects/{PROJECT}/locations/Not..A..Location/publishers/google/models/"
                    "gemini-2.5-flash:generateContent", json=prompt)
    assert r.status_code == 400, r.text
    expected.requests[("none", "400")] += 1
    return expected


# ----------------------------------------------------------------------------- fixture


@dataclass
class Scenario:
    emulator: ServerHandle
    sidecar: SidecarProcess
    prometheus: PrometheusProcess
    expected: Expected  # one phase
    t_first: float  # sample time of the scrape after phase A
    t_second: float  # sample time of the scrape after phase B
    exposition: str

    @property
    def window(self) -> str:
        return f"{round((self.t_second - self.t_first) * 1000)}ms"

    @property
    def seconds(self) -> float:
        return round((self.t_second - self.t_first) * 1000) / 1000

    def at_end(self, expr: str) -> list[dict[str, Any]]:
        return self.prometheus.query(expr, self.t_second)


def _last_sample_time(prometheus: PrometheusProcess) -> float:
    value = prometheus.scalar("max(timestamp(vertex_sidecar_requests_total))")
    assert value is not None
    return value


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    if _MISSING:
        pytest.skip("needs the Debian prometheus package (prometheus, promtool)")
    assert PROMETHEUS is not None and PROMTOOL is not None, "CI must install Debian's prometheus package"
    tmp = tmp_path_factory.mktemp("prometheus-scenario")
    with running_server(create_combined_app(project_id=PROJECT)) as emulator:
        metadata = emulator.app.state.metadata_app.state
        metadata.fail_tokens = True  # the first refreshes fail, as on a fresh GKE pod
        metadata.fail_tokens_status = 404  # google-auth retries 5xx for seconds, a 404 it reports at once
        sidecar = start_sidecar({"upstreams": upstreams_for(emulator), **SIDECAR_CONFIG}, tmp, env=adc_env(emulator),
                                wait_ready=False)
        prometheus: PrometheusProcess | None = None
        try:
            deadline = time.monotonic() + 20
            while 'result="failure"' not in httpx.get(f"{sidecar.admin_url}/metrics").text:
                assert time.monotonic() < deadline, "no failed token refresh was counted"
                time.sleep(0.05)
            refused = httpx.post(f"{sidecar.base_url}/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/"
                                 "models/gemini-2.5-flash:generateContent", json={}, timeout=30)
            assert refused.status_code == 503, refused.text
            metadata.fail_tokens = False
            sidecar.wait_ready(timeout=30)
            prometheus = start_prometheus(tmp / "prometheus", sidecar.admin_url.removeprefix("http://"),
                                          rule_files=[RULES])
            with httpx.Client(timeout=30) as client:
                first = send_traffic(client, sidecar, "a")
                prometheus.wait_for("sum(vertex_sidecar_requests_total)", lambda v: v == 1 + first.total)
                t_first = _last_sample_time(prometheus)
                second = send_traffic(client, sidecar, "b")
                assert second.requests == first.requests and second.tokens == first.tokens
                prometheus.wait_for("sum(vertex_sidecar_requests_total)", lambda v: v == 1 + 2 * first.total)
                t_second = _last_sample_time(prometheus)
                exposition = client.get(f"{sidecar.admin_url}/metrics").text
            yield Scenario(emulator, sidecar, prometheus, first, t_first, t_second, exposition)
        finally:
            if prometheus is not None:
                prometheus.stop()
            sidecar.terminate()


# -------------------------------------------------------------------------------- tests


def by(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1]) for r in result}


@needs_prometheus
def test_raw_counters_match_what_the_emulator_reported(scenario: Scenario) -> None:
    expected, q = scenario.expected, scenario.at_end
    requests = by(q("sum by (route, code) (vertex_sidecar_requests_total)"), "route", "code")
    assert requests == {key: 2.0 * n + (key == ("gemini", "503")) for key, n in expected.requests.items()} | {
        ("gemini", "503"): 1.0}  # + the request refused before the first token
    tokens = by(q("sum by (gen_ai_token_type) (gen_ai_client_token_usage_sum)"), "gen_ai_token_type")
    assert tokens == {(kind,): 2.0 * n for kind, n in expected.tokens.items()}
    assert expected.tokens["reasoning"] > 0  # gemini-2.5 thinks
    counts = by(q('sum(gen_ai_client_token_usage_count{gen_ai_token_type="input"})'))
    assert counts == {(): 2.0 * expected.usage_responses}
    cost = by(q("sum by (model) (vertex_sidecar_cost_usd_total)"), "model")
    assert cost.keys() == {(m,) for m in expected.cost_by_model}
    for (model,), usd in cost.items():
        assert usd == pytest.approx(2 * expected.cost_by_model[model], rel=1e-9)
    ttft = by(q("sum(gen_ai_server_time_to_first_token_seconds_count)"))
    assert ttft == {(): 2.0 * expected.streaming_ok}
    errors = by(q("sum by (route, reason) (vertex_sidecar_upstream_errors_total)"), "route", "reason")
    assert errors == {("rest", "status_503"): 2.0, ("rest", "status_429"): 2.0}
    team = by(q('sum by (team) (vertex_sidecar_requests_total{route="gemini"})'), "team")
    assert team[("search",)] == 6.0
    assert by(q("vertex_sidecar_ready"), "namespace") == {(NAMESPACE,): 1.0}
    refreshes = by(q("vertex_sidecar_token_refresh_total"), "credential", "result")
    assert refreshes[("default", "success")] >= 1 and refreshes[("default", "failure")] >= 1
    assert by(q("vertex_sidecar_inflight_requests")) == {(): 0.0}


@needs_prometheus
def test_access_log_carries_the_emulators_tokens_and_the_tags(scenario: Scenario) -> None:
    entries = {e["request_id"]: e for e in scenario.sidecar.access_log()}
    for phase in ("a", "b"):
        for request_id, tokens in scenario.expected.log_tokens.items():
            entry = entries[phase + request_id[1:]]
            assert {k: entry["tokens"][k] for k in tokens} == tokens, entry
            assert entry["cost_usd"] > 0 and entry["pricing"] == "known"
    tagged = [e for e in entries.values() if e.get("tags")]
    assert tagged and all(e["tags"] == ["exp-1", "prod"] for e in tagged)
    assert "exp-1" not in scenario.exposition  # tags go to logs, not to metrics
    openai = [e for e in entries.values() if e["operation"] == "chat/completions"]
    assert openai and all(e["model"].endswith("gemini-2.0-flash-001") and e["route"] == "gemini" for e in openai)


@needs_prometheus
def test_promtool_accepts_the_live_exposition(scenario: Scenario) -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=scenario.exposition, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every panel target."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                out.append((path.name, panel["title"], target["expr"]))
    return out


def dashboard_variables() -> list[tuple[str, str, str]]:
    """(dashboard file, metric, label) of every `label_values(metric, label)` variable."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] == "query":
                match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
                assert match, variable
                out.append((path.name, match.group(1), match.group(2)))
    return out


# Panels that stay empty in this scenario: no Live traffic, no config reload, no refresh
# failure inside the evaluation window (the failures happened before it).
EMPTY_HERE = {
    "vertex-sidecar-live.json": None,  # every panel
    "vertex-sidecar-credentials.json": {"Config reloads / min by result"},
    # No budgets here (tests/integration/test_cost_dashboard.py has them).
    "vertex-sidecar-cost.json": {"Budget used (%)", "Budget spent (USD)", "Requests over budget / min by action"},
}


def expand(expr: str, window: str) -> str:
    for variable in ("$namespace", "$route", "$model", "$credential", "$team"):
        expr = expr.replace(variable, ".*")
    return expr.replace("$__rate_interval", window).replace("$__range", window)


@needs_prometheus
def test_every_dashboard_query_runs_and_matches_the_traffic(scenario: Scenario) -> None:
    expected, seconds = scenario.expected, scenario.seconds
    total = expected.total
    io_tokens = expected.tokens["input"] + expected.tokens["output"]
    five_xx = sum(n for (route, code), n in expected.requests.items() if code.startswith("5"))
    throttled = sum(n for (route, code), n in expected.requests.items() if code == "429")
    by_code: Counter[str] = Counter()
    for (route, code), n in expected.requests.items():
        by_code[code] += n
    checks: dict[str, Callable[[list[dict[str, Any]]], None]] = {
        "Requests / s": lambda r: _approx(by(r), {(): total / seconds}),
        "5xx ratio": lambda r: _approx(by(r), {(): five_xx / total}),
        "429 ratio": lambda r: _approx(by(r), {(): throttled / total}),
        "Tokens / s": lambda r: _approx(by(r), {(): io_tokens / seconds}),
        "Cost in range (USD)": lambda r: _approx(by(r), {(): sum(expected.cost_by_model.values())}),
        "In-flight requests": lambda r: _approx(by(r), {(): 0.0}),
        "Requests / s by status code": lambda r: _approx(by(r, "code"), {
            (c,): n / seconds for c, n in by_code.items()}),
        "Upstream errors / s by reason": lambda r: _approx(by(r, "reason"), {
            ("status_503",): 1 / seconds, ("status_429",): 1 / seconds}),
        "Tokens / s by type": lambda r: _approx(by(r, "gen_ai_token_type"), {
            (k,): n / seconds for k, n in expected.tokens.items()}),
        "Tokens / s by model (input + output)": lambda r: _approx(by(r, "gen_ai_request_model"), {
            (m,): n / seconds for m, n in expected.tokens_by_model.items()}),
        "Cost (USD / hour) by model": lambda r: _approx(by(r, "model"), {
            (m,): usd / seconds * 3600 for m, usd in expected.cost_by_model.items()}),
        "Cost (USD / hour) by route": lambda r: _approx(by(r, "route"), {
            (m,): usd / seconds * 3600 for m, usd in expected.cost_by_route.items()}),
        "Cost in range by model (USD)": lambda r: _approx(by(r, "model"), {
            (m,): usd for m, usd in expected.cost_by_model.items()}),
        "Tokens in range by route": lambda r: _approx(by(r, "route"), {
            (m,): n for m, n in expected.tokens_by_route.items()}),
        "Sidecars not ready": lambda r: _approx(by(r), {(): 0.0}),
        "Sidecars": lambda r: _approx(by(r), {(): 1.0}),
        "Refresh failures in range": lambda r: _approx(by(r), {(): 0.0}),
        "Requests refused for want of a token / s": lambda r: _approx(by(r, "route"), {("gemini",): 0.0}),
        "Errors the sidecar answered / s by reason": lambda r: _approx(by(r, "reason"), {
            ("invalid_path",): 1 / seconds, ("credentials_unavailable",): 0.0}),
    }
    checked = set()
    for name, title, expr in dashboard_queries():
        result = scenario.at_end(expand(expr, scenario.window))
        empty_here = EMPTY_HERE.get(name, set())
        if empty_here is None or title in empty_here:
            assert result == [], (title, expr, result)
            continue
        assert result, f"{name}: {title!r} returned nothing: {expr}"
        for sample in result:
            value = float(sample["value"][1])
            assert math.isfinite(value) and value >= 0, (title, sample)
        if title in checks:
            checks[title](result)
            checked.add(title)
        elif "histogram_quantile" in expr:
            assert all(0 < float(s["value"][1]) < 60 for s in result), (title, result)
    assert checked == set(checks), f"panels not found: {set(checks) - checked}"


def _approx(got: dict[tuple[str, ...], float], want: dict[tuple[str, ...], float]) -> None:
    assert got.keys() == want.keys(), (got, want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), (key, got, want)


@needs_prometheus
def test_dashboard_variables_find_their_values(scenario: Scenario) -> None:
    for name, metric, label in dashboard_variables():
        values = scenario.prometheus.api(f"label/{label}/values", **{"match[]": metric})
        if name == "vertex-sidecar-live.json" and metric.startswith("vertex_sidecar_live"):
            assert values == []
            continue
        assert values, (name, metric, label)
    routes = scenario.prometheus.api("label/route/values", **{"match[]": "vertex_sidecar_requests_total"})
    assert sorted(routes) == ["claude", "gemini", "none", "rest"]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


@needs_prometheus
def test_alert_expressions_fire_only_where_the_traffic_says(scenario: Scenario) -> None:
    firing = {}
    for rule in alert_rules():
        result = scenario.at_end(rule["expr"])
        firing[rule["alert"]] = {tuple(sorted(r["metric"].items())) for r in result}
    # route "rest" got one 503 and one 429 (and nothing else) per phase
    assert firing["VertexSidecarUpstream5xxRatioHigh"] == {(("namespace", NAMESPACE), ("route", "rest"))}
    assert firing["VertexSidecar429RatioHigh"] == {(("namespace", NAMESPACE), ("route", "rest"))}
    # the failed first refreshes were followed by a good one
    assert firing["VertexSidecarTokenRefreshFailing"] == set()
    assert firing["VertexSidecarTimeToFirstTokenHigh"] == set()
    assert firing["VertexSidecarNotReady"] == set()
    ratio = scenario.prometheus.scalar(
        'sum(rate(vertex_sidecar_upstream_errors_total{reason!="status_429"}[5m])) '
        '/ sum(rate(vertex_sidecar_requests_total{route="rest"}[5m]))', scenario.t_second)
    assert ratio is not None and 0.05 < ratio <= 1


@needs_prometheus
def test_prometheus_loads_the_rules_and_they_go_pending(scenario: Scenario) -> None:
    groups = scenario.prometheus.api("rules")["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == {rule["alert"] for rule in alert_rules()}
    assert all(rule["health"] == "ok" for rule in rules.values()), rules

    def pending() -> set[str]:
        alerts = scenario.prometheus.api("alerts")["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "pending"}

    deadline = time.monotonic() + 10
    while pending() != {"VertexSidecarUpstream5xxRatioHigh", "VertexSidecar429RatioHigh"}:
        assert time.monotonic() < deadline, pending()
        time.sleep(0.2)


def test_reload_applies_pricing_overrides_and_header_labels(tmp_path: Path) -> None:
    with running_server(create_combined_app(project_id=PROJECT)) as emulator:
        config: dict[str, Any] = {"upstreams": upstreams_for(emulator), "reload_interval_seconds": 0.1}
        sidecar = start_sidecar(config, tmp_path, env=adc_env(emulator))
        try:
            url = (f"{sidecar.base_url}/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/"
                   "gemini-2.5-flash:generateContent")
            prompt = {"contents": [{"role": "user", "parts": [{"text": "one two three"}]}]}
            headers = {"x-team": "search", "x-request-id": "before"}
            assert httpx.post(url, json=prompt, headers=headers).status_code == 200
            overrides = {"pricing": {"models": {"gemini-2.5-flash": {"input": 1000.0, "output": 0.0}}},
                         "metrics": {"header_labels": {"x-team": "team"}}}
            sidecar.config_path.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                                                           **config, **overrides}))
            deadline = time.monotonic() + 20
            while 'vertex_sidecar_config_reloads_total{result="success"} 1.0' not in httpx.get(
                    f"{sidecar.admin_url}/metrics").text:
                assert time.monotonic() < deadline, "the sidecar did not reload its config"
                time.sleep(0.05)
            response = httpx.post(url, json=prompt, headers={**headers, "x-request-id": "after"})
            assert response.status_code == 200
            metrics = httpx.get(f"{sidecar.admin_url}/metrics").text
            assert 'team="search"' in metrics
            input_tokens = response.json()["usageMetadata"]["promptTokenCount"]
            deadline = time.monotonic() + 10
            while not any(e["request_id"] == "after" for e in sidecar.access_log()):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            after = next(e for e in sidecar.access_log() if e["request_id"] == "after")
            assert after["cost_usd"] == pytest.approx(input_tokens * 1000.0 / 1e6)
        finally:
            sidecar.terminate()


# ---------------------------------------------------------------- files, no servers needed


@pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"), reason="needs promtool (Debian package prometheus)")
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([PROMTOOL, "test", "rules", "vertex-sidecar.rules.test.yaml"], cwd=ALERTS,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


def test_dashboards_are_generated_and_stable() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "monitoring" / "generate_dashboards.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    uids = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        uids[board["uid"]] = board["title"]
        variables = board["templating"]["list"]
        assert variables[0]["type"] == "datasource" and variables[0]["query"] == "prometheus"
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert uids == {
        "vertex-sidecar-overview": "Vertex sidecar / Overview",
        "vertex-sidecar-credentials": "Vertex sidecar / Credentials",
        "vertex-sidecar-live": "Vertex sidecar / Live sessions",
        "vertex-sidecar-cost": "Vertex sidecar / Cost by team",
    }
