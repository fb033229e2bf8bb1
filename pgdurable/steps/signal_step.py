"""Signal waits (``df.wait_for_signal``): a durable inbox (docs/decisions.md D6). The step
consumes the oldest signal of its name in its checkpoint's transaction; with none waiting it
times out if its durable timer fired, else parks its task until df.signal wakes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from pgdurable.errors import StepError
from pgdurable.values import effective_limit, loads, too_large
from pgdurable.worker.checkpoint import RESULT_CAP_SETTING, Checkpointer, Outcome
from pgdurable.worker.instance import InstanceCtx
from pgdurable.worker.task import Task


class SignalStep:
    """Take a signal for a waiting step, or park it."""

    def __init__(
        self,
        *,
        q: Callable[[str], Any],
        worker_id: str,
        result_max_bytes: int,
        checkpointer: Checkpointer,
    ) -> None:
        self.q = q
        self.worker_id = worker_id
        self.result_max_bytes = result_max_bytes
        self.checkpointer = checkpointer

    async def run(
        self, conn: psycopg.AsyncConnection[Any], ctx: InstanceCtx, task: Task, idx: int
    ) -> Outcome | None:
        """Consume a signal (checkpointed here, with the consumption) or park the task:
        None. The wait's timeout (its deadline passed, nothing came): that Outcome, for the
        caller to checkpoint."""
        name = loads(ctx.configs[idx])["signal_name"]
        while True:
            # the signal is consumed in the checkpoint's transaction: a crash in between
            # rolls the consumption back, so no signal is ever lost
            async with conn.transaction():
                cur = await conn.execute(
                    self.q("take_signal_row"),
                    (ctx.instance_id, name, effective_limit(self.result_max_bytes)),
                )
                row = await cur.fetchone()  # a row even when data is JSON null
                if row is not None:
                    outcome = self._received(name, row)
                    await self.checkpointer.record(conn, ctx, task, idx, outcome, in_tx=True)
                    return None
            if task.deadline is not None and task.deadline <= task.clock:
                return Outcome.success({"signal_name": name, "timed_out": True, "data": None})
            # runs row first (as df.signal): a signal committed after our look is then
            # either visible to the park or wakes the parked task
            async with conn.transaction():
                await conn.execute(self.q("lock_run"), (ctx.instance_id,))
                cur = await conn.execute(
                    self.q("park_signal"),
                    (self.worker_id, ctx.instance_id, task.node_id, name, ctx.instance_id, name),
                )
                parked, pending = (await cur.fetchone()) or (False, False)
            if parked or not pending:
                return None  # parked, or the task is no longer ours

    def _received(self, name: str, row: tuple[Any, ...]) -> Outcome:
        """The outcome of a consumed signal (data, size): data over the cap stayed in the
        database (NULL): the wait fails, the signal consumed with its failure."""
        data_text, size = row[0], row[1]
        try:
            if data_text is None and size is not None:
                raise too_large("signal data", size, self.result_max_bytes, RESULT_CAP_SETTING)
            try:
                data = None if data_text is None else loads(data_text)
            except ValueError as exc:
                raise StepError(f"signal data cannot be read: {exc}") from None
        except StepError as exc:
            return Outcome.failure(exc)
        return Outcome.success({"signal_name": name, "timed_out": False, "data": data})
