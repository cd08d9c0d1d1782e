#!/usr/bin/env bash
# Install the Python client tests/integration/test_aiplatform_sdk.py runs (google-cloud-aiplatform,
# for `vertexai.generative_models`) into its own git-ignored venv, .tools/aiplatform-venv, as
# tests/aiplatform/requirements.txt pins it. Not in the project's .venv: the package's
# `*-nspkg.pth` would put a `google` module into every interpreter there (see requirements.txt).
# Same interpreter as the Makefile's venv ($PYTHON, python3 by default); the venv is made anew each run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.tools/aiplatform-venv
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/aiplatform/requirements.txt
"$VENV/bin/python" -c 'import importlib.metadata as m; print("google-cloud-aiplatform", m.version("google-cloud-aiplatform"))'
