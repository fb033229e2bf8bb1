"""Test-only switches. No-ops unless a test (or `pgdurable verify`'s proof run) sets them.

``PGDURABLE_TEST_BROKEN_CHECKPOINT=1`` deliberately breaks the exactly-once rule: a SQL
step's statement commits in its own transaction and its checkpoint follows 200 ms later in
another, so a crash in between re-runs the statement. It exists to prove that
``pgdurable verify`` catches exactly that bug (issue 8); never set it anywhere else.

``PGDURABLE_TEST_BLIND_COMMIT_RETRY=1`` deliberately mishandles an ambiguous commit: when a
batch of SQL steps loses its connection at COMMIT (the reply never came: the transaction may
well have committed), the worker takes it for "not committed" and runs the batch's statements
again at once in a new transaction, without their checkpoints and so without the fence (the
lease owner and generation the checkpoint checks) that would have refused them. It exists to
prove that ``pgdurable verify``'s ``ambiguous_commit`` fault and checker catch that double run
(issue 17); the hook is :func:`blind_rerun`, called from pgdurable/worker/batch.py.

``PGDURABLE_TEST_IGNORE_FENCE=1`` deliberately ignores the fence: a SQL step whose checkpoint
is refused because its task is no longer this worker's (its lease expired while the worker was
stalled or cut off, and another worker took the step over) commits its statement anyway. It
exists to prove that verify's ``stall`` and ``partition`` faults catch a worker that runs a
step another worker has taken over; the hooks are in pgdurable/steps/sql_step.py (a step
run alone) and pgdurable/worker/batch.py (a batch: every statement of it commits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

BROKEN_CHECKPOINT = os.environ.get("PGDURABLE_TEST_BROKEN_CHECKPOINT") == "1"
# how long the broken build leaves a step committed but not checkpointed
BROKEN_WINDOW_SECONDS = 0.2
BLIND_COMMIT_RETRY = os.environ.get("PGDURABLE_TEST_BLIND_COMMIT_RETRY") == "1"
IGNORE_FENCE = os.environ.get("PGDURABLE_TEST_IGNORE_FENCE") == "1"

logger = logging.getLogger(__name__)


async def blind_rerun(sessions: Any, call: Any, role: int, texts: list[str]) -> None:
    """The planted bug of ``BLIND_COMMIT_RETRY``: run ``texts`` (a batch's statements, whose
    COMMIT's reply was lost) again, each in a transaction of its own on a new step connection
    of the role's runner ``call``, with no checkpoint. Failures are swallowed (the database
    may be gone): the caller raises its connection error as before."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            async with sessions.steps.connection() as conn:
                cap = sessions.cap(conn)
                for text in texts:
                    await conn.execute(b"begin")
                    await conn.execute(
                        sessions.q("step_settings"),
                        (cap, role, "pgdurable blind rerun", role, None),
                    )
                    await conn.execute(call, (cap, text, sessions.runner_cap))
                    await conn.execute(sessions.commit_reset)
                logger.warning("planted bug: %d statement(s) run again blindly", len(texts))


async def commit_anyway(conn: Any) -> None:
    """The planted bug of ``IGNORE_FENCE``: commit a fenced step's transaction (its statement
    ran; its checkpoint wrote nothing). Failures are swallowed: the caller goes on as before."""
    with contextlib.suppress(Exception):
        await conn.execute(b"commit")
        logger.warning("planted bug: a fenced step's statement committed")
