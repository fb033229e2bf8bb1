"""``python -m bench``: run the benchmark harness (see bench/harness.py)."""

import sys

from .harness import main

sys.exit(main())
