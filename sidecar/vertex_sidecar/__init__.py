"""vertex-passthrough sidecar: the data plane."""
__version__ = "0.1.0"
