"""Test-only switches. No-ops unless a test (or `pgdurable verify`'s proof run) sets them.

``PGDURABLE_TEST_BROKEN_CHECKPOINT=1`` deliberately breaks the exactly-once rule: a SQL
step's statement commits in its own transaction and its checkpoint follows 200 ms later in
another, so a crash in between re-runs the statement. It exists to prove that
``pgdurable verify`` catches exactly that bug (issue 8); never set it anywhere else.
"""

from __future__ import annotations

import os

BROKEN_CHECKPOINT = os.environ.get("PGDURABLE_TEST_BROKEN_CHECKPOINT") == "1"
# how long the broken build leaves a step committed but not checkpointed
BROKEN_WINDOW_SECONDS = 0.2
