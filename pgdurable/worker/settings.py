"""The deployment-wide ``pg_durable.*`` settings as one worker process holds them: read at
start, every maintenance round and on SIGHUP (:meth:`Settings.load`), a bad value logged once
and the last good one kept; and what follows from them in this process (how many step
transactions it opens at once, the loop-limits epoch its cached instances are checked
against)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import args_row

from pgdurable.queries import q
from pgdurable.values import INSTANCE_MAX_BYTES_DEFAULT

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SettingsRow:
    """The ``settings`` query's row (each value as text: the worker parses it)."""

    loop_min_interval_ms: str
    loop_max_iterations: str
    current_database: str
    max_user_connections: str
    max_instance_bytes: str
    max_connections_per_role: str
    step_statement_timeout: str
    database_setting_names: list[str] | None
    role_loop_settings: str


class Settings:
    """The values in use (attributes), refreshed by :meth:`load`."""

    def __init__(self, engine: str, slots: int, pools: Callable[[], Iterable[Any]]) -> None:
        self.engine = engine
        self.slots = slots
        self.pools = pools  # the service's pools, drained when a database setting is reset
        self.max_iterations = 100_000
        self.loop_min_interval_ms = 1000
        self.max_instance_bytes = INSTANCE_MAX_BYTES_DEFAULT
        self.max_user_connections = 10
        self.step_timeout = "0"  # step_statement_timeout, for `database =>` steps
        self.role_cap = 0  # pg_durable.max_connections_per_role
        self.slotted_roles: set[int] = set()  # roles whose per-role slot rows we made
        self.current_db = ""
        # step transactions this process opens at once (at most its slots)
        self.sql_limit = 1
        self.sql_sem = asyncio.Semaphore(1)
        self.limits_epoch = 0  # bumped when the loop limits may have changed
        self._limits_key: tuple[Any, ...] | None = None
        self._db_setting_names: set[str] | None = None  # pg_durable.* this database sets
        self._bad: dict[str, str] = {}  # setting -> the unusable value last logged
        self._seen: dict[str, str] | None = None  # as last read (to log changes)

    async def load(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Read the deployment-wide pg_durable.* settings (@engine@.setting_db: ALTER DATABASE
        … SET read fresh, else ALTER SYSTEM / postgresql.conf). One query; what did not
        change is left alone."""
        cur = conn.cursor(row_factory=args_row(SettingsRow))
        row = await (await cur.execute(q("settings", self.engine))).fetchone()
        assert row is not None
        self.current_db = row.current_database
        seen = {
            "loop_min_interval_ms": row.loop_min_interval_ms,
            "loop_max_iterations": row.loop_max_iterations,
            "max_user_connections": row.max_user_connections,
            "max_instance_bytes": row.max_instance_bytes,
            "max_connections_per_role": row.max_connections_per_role,
            "step_statement_timeout": row.step_statement_timeout,
        }
        if self._seen is not None:
            changed = [f"pg_durable.{k} = {v}" for k, v in seen.items() if self._seen.get(k) != v]
            if changed:
                logger.info(
                    "deployment settings changed: %s",
                    "; ".join(changed),
                    extra={"event": "settings.changed"},
                )
        self._seen = seen
        loop_min = self._int(
            "loop_min_interval_ms", row.loop_min_interval_ms, 0, self.loop_min_interval_ms
        )
        max_iter = self._int("loop_max_iterations", row.loop_max_iterations, 1, self.max_iterations)
        # never open more step transactions than the deployment has step slots: the rest
        # would only wait for a slot inside PostgreSQL, holding a connection
        self.max_user_connections = self._int(
            "max_user_connections", row.max_user_connections, None, self.max_user_connections
        )
        limit = max(1, min(self.slots, self.max_user_connections))
        if limit != self.sql_limit:
            # steps holding the old semaphore release it (each keeps the object it acquired);
            # the slot rows in the database stay the real cap meanwhile
            self.sql_limit = limit
            self.sql_sem = asyncio.Semaphore(limit)
        self.max_instance_bytes = self._int(
            "max_instance_bytes", row.max_instance_bytes, None, self.max_instance_bytes
        )
        role_cap = self._int(
            "max_connections_per_role", row.max_connections_per_role, None, self.role_cap
        )
        if role_cap != self.role_cap:
            # per-role step slots exist only where a per-role cap is set: made again for it
            self.role_cap = role_cap
            self.slotted_roles.clear()
        self.step_timeout = row.step_statement_timeout
        names = set(row.database_setting_names or ())
        if self._db_setting_names is not None and self._db_setting_names - names:
            # ALTER DATABASE … RESET: sessions opened before still hold the value they
            # connected with, which setting_db would fall back to; open fresh ones
            logger.info(
                "database settings %s were reset; reopening the service's sessions",
                ", ".join(sorted(self._db_setting_names - names)),
                extra={"event": "settings.reset"},
            )
            for pool in self.pools():
                drain = getattr(pool, "drain", None)
                if drain is not None:
                    await drain()
        self._db_setting_names = names
        key = (loop_min, max_iter, row.role_loop_settings)
        if key != self._limits_key:
            # loop limits (the deployment's or a role's) changed: the instances held in
            # memory reload before their next step (InstanceCache.get)
            if self._limits_key is not None:
                self.limits_epoch += 1
            self._limits_key = key
        self.loop_min_interval_ms, self.max_iterations = loop_min, max_iter

    def _int(self, name: str, raw: str, minimum: int | None, current: int) -> int:
        """A deployment-wide integer setting, or (logging why, once per value) the value in
        use when it is not a whole number (at least ``minimum``)."""
        try:
            value = int(raw.strip())
            if minimum is None or value >= minimum:
                self._bad.pop(name, None)
                return value
        except ValueError:
            pass
        if self._bad.get(name) != raw:
            self._bad[name] = raw
            need = "a whole number" + (f" of at least {minimum}" if minimum is not None else "")
            logger.error(
                "pg_durable.%s is %r, not %s: keeping %d; fix it with ALTER DATABASE "
                "… SET pg_durable.%s or RESET it",
                name,
                raw,
                need,
                current,
                name,
                extra={"event": "settings.invalid"},
            )
        return current
