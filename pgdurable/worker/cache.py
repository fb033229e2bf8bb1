"""The instance cache: the :class:`~pgdurable.worker.instance.InstanceCtx` of the instances
this worker ran recently (graph, scheduler, results), loaded on a miss and dropped when it may
be behind the database (:meth:`InstanceCache.forget`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

import psycopg

from .instance import InstanceCtx, loop_limits
from .sessions import Sessions
from .settings import Settings

logger = logging.getLogger(__name__)

# How many instance contexts a worker keeps (graph + scheduler + results). A miss costs
# one reload of the instance's rows.
CTX_CACHE_SIZE = 2048
# A start's instance loaded with the others of its claim (:meth:`InstanceCache.preload`) counts
# as freshly loaded this long (the claim leased its start task: nothing but the tenant moves
# it meanwhile, as after any load); a start dispatched later loads it again.
PRELOAD_TTL_S = 1.0
PRELOAD_MAX = 4096


def split_load(
    got: list[tuple[Any, ...]],
) -> tuple[tuple[Any, ...], list[tuple[Any, ...]], list[tuple[str, Any]]]:
    """The rows of one ``load`` (``_load_v2``: the instance's first, then its nodes', then its
    named results' by seq) as the three reads before it returned them: the instance's row
    (``load_instance``), the nodes' (``load_nodes``), the named results (``load_results``)."""
    inst = got[0][1:17]
    if len(got) == 1:
        return inst, [], []
    rows = [r[17:] for r in got if r[0] == 1]
    named = [(r[20], r[24]) for r in got if r[0] == 2]
    return inst, rows, named


class InstanceCache:
    """Least recently used instance contexts, by instance id."""

    def __init__(self, sessions: Sessions, settings: Settings, size: int = CTX_CACHE_SIZE) -> None:
        self.sessions = sessions
        self.settings = settings
        self.size = size
        self.ctxs: OrderedDict[str, InstanceCtx] = OrderedDict()
        # instance -> (when, its load rows): preloaded for the next fresh get
        self.preloaded: dict[str, tuple[float, list[tuple[Any, ...]]]] = {}

    def peek(self, instance_id: str) -> InstanceCtx | None:
        """The cached context, as is (no freshness check, no load)."""
        return self.ctxs.get(instance_id)

    def usable(self, ctx: InstanceCtx, version: int | None) -> bool:
        """Is a cached context still the database's (as far as this process can tell)?"""
        if version is not None and ctx.version < version:
            return False  # another worker checkpointed this instance since we cached it
        # loop settings changed since it was loaded: its limits are stale
        return ctx.limits_epoch == self.settings.limits_epoch

    def touch(self, instance_id: str) -> None:
        self.ctxs.move_to_end(instance_id)

    def forget(self, instance_id: str, ctx: InstanceCtx | None = None) -> None:
        """Drop an instance's cached state, and mark it (and ``ctx``) dead for every holder."""
        cached = self.ctxs.pop(instance_id, None)
        if cached is not None:
            cached.dead = True
        if ctx is not None:
            ctx.dead = True

    async def get(
        self,
        conn: psycopg.AsyncConnection[Any],
        instance_id: str,
        fresh: bool = False,
        version: int | None = None,
        lock: asyncio.Lock | None = None,
        start: bool = False,
    ) -> InstanceCtx | None:
        """The instance's context: cached unless ``fresh``, or older than ``version``, or
        loaded under other loop limits; else loaded on ``conn`` (None: no such instance).
        ``lock``: the caller holds it, and the reloaded state is under it too. ``start``: a
        start task's first look, which may take what its claim preloaded."""
        ctx = None if fresh else self.ctxs.get(instance_id)
        if ctx is not None and self.usable(ctx, version):
            self.ctxs.move_to_end(instance_id)
            return ctx
        got = self._take_preloaded(instance_id) if start else None
        if got is None:
            # one statement (behind the capability on a step connection)
            cur = await conn.execute(*self.sessions.engine_query(conn, "load", (instance_id,)))
            got = await cur.fetchall()
        if not got:
            return None
        inst, rows, named = split_load(got)
        old = self.ctxs.get(instance_id)
        epoch = self.settings.limits_epoch
        min_interval, max_iterations = loop_limits(
            inst, self.settings.loop_min_interval_ms, self.settings.max_iterations
        )
        ctx = InstanceCtx.from_rows(instance_id, inst, rows, named, max_iterations, min_interval)
        ctx.limits_epoch = epoch
        logger.debug(
            "loaded instance (version %d)", ctx.version, extra={"event": "instance.loaded"}
        )
        if lock is not None:
            ctx.lock = lock
        elif old is not None:
            ctx.lock = old.lock
        self.ctxs[instance_id] = ctx
        while len(self.ctxs) > self.size:
            self.ctxs.popitem(last=False)
        return ctx

    async def preload(self, conn: psycopg.AsyncConnection[Any], instance_ids: list[str]) -> None:
        """Load several instances in one statement (the starts one claim took): each counts
        as freshly loaded for its next ``get(fresh=True)`` within PRELOAD_TTL_S."""
        cur = await conn.execute(self.sessions.q("load_many"), (instance_ids,))
        by_id: dict[str, list[tuple[Any, ...]]] = {}
        for r in await cur.fetchall():
            by_id.setdefault(r[0], []).append(r[1:-1])  # (id, the load's row…, ordinality)
        if len(self.preloaded) + len(by_id) > PRELOAD_MAX:
            self.preloaded.clear()  # never used (their starts went elsewhere): drop them
        now = time.monotonic()
        for iid in instance_ids:
            # an instance with no rows (gone) is known gone as of now too
            self.preloaded[iid] = (now, by_id.get(iid, []))

    def _take_preloaded(self, instance_id: str) -> list[tuple[Any, ...]] | None:
        got = self.preloaded.pop(instance_id, None)
        if got is None or time.monotonic() - got[0] > PRELOAD_TTL_S:
            return None
        return got[1]
