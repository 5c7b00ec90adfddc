"""``python -m river.runtime.bench``: the same as the ``river-bench`` command."""

import sys

from river.runtime.bench.cli import console

sys.exit(console())
