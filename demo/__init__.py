"""`make demo`: the sidecar in front of the local Vertex AI emulator, no cloud account needed."""
