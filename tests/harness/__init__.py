"""Test-side helpers that start the real sidecar process."""
