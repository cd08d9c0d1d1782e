"""`python -m vertex_sidecar` runs the sidecar, like the `vertex-sidecar` command."""

import sys

from .cli import main

sys.exit(main())
