"""vertex-passthrough operator: the control plane."""
__version__ = "0.1.0"
