"""Settings of the service itself: one frozen dataclass and its defaults.

Settings of workflows (``pg_durable.*``, e.g. ``loop_min_interval_ms``) live in PostgreSQL
and are read at call time, their defaults with them (pgdurable/sql/queries.sql,
``settings``); these are the service's own: DSN, worker count, slots, lease, HTTP policy.
Every field is a ``pgdurable serve`` option with a ``PGDURABLE_*`` environment
variable (precedence: flag > env > default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import ConfigError

WORKERS_DEFAULT = os.cpu_count() or 2
# Concurrent steps per worker process. SQL steps each hold one pooled connection while
# they run; 16 keeps a 2-core box busy without exceeding PostgreSQL's default 100
# connections with several workers and services.
SLOTS_DEFAULT = 16
LEASE_SECONDS_DEFAULT = 30
# Producer poll interval when no NOTIFY arrives (NOTIFY is the fast path; this is the
# safety net for missed notifications), jittered by up to 10 %.
POLL_INTERVAL_DEFAULT = 1.0
# Maintenance period: lease rescue, heartbeats.
MAINTENANCE_INTERVAL_DEFAULT = 2.0
RESULT_MAX_BYTES_DEFAULT = 10 * 1024 * 1024
HTTP_POLICY_DEFAULT = "public"
# The engine's private schema (docs/decisions.md D2): the one spelling of its default name;
# the modules that need it import it from here.
ENGINE_SCHEMA_DEFAULT = "pgdurable"


@dataclass(frozen=True)
class ServeConfig:
    """Configuration of ``pgdurable serve`` and its worker processes."""

    dsn: str
    """PostgreSQL connection string of the df database, logging in as the service role
    (pgdurable_service). Required (serve starts an embedded PostgreSQL and fills this in
    when none is given)."""
    step_dsn: str = ""
    """Connection string of the step sessions, logging in as pgdurable_step. Defaults to
    ``dsn`` with that user (and libpq's password lookup: ~/.pgpass)."""
    workers: int = WORKERS_DEFAULT
    """Worker processes forked by the supervisor. Defaults to the CPU count."""
    slots: int = SLOTS_DEFAULT
    """Concurrent steps per worker process. Defaults to 16."""
    lease_seconds: int = LEASE_SECONDS_DEFAULT
    """How long a claimed step stays ours without a heartbeat. Defaults to 30."""
    poll_interval: float = POLL_INTERVAL_DEFAULT
    """Seconds between claims when no NOTIFY arrives. Defaults to 1.0."""
    maintenance_interval: float = MAINTENANCE_INTERVAL_DEFAULT
    """Seconds between lease rescues / heartbeats. Defaults to 2.0."""
    engine_schema: str = ENGINE_SCHEMA_DEFAULT
    """The engine's private schema. Defaults to pgdurable."""
    http_policy: str = HTTP_POLICY_DEFAULT
    """deny-all, public or allow-list. Defaults to public."""
    http_allow: tuple[str, ...] = field(default_factory=tuple)
    """Host patterns admitted under allow-list. Defaults to none."""
    result_max_bytes: int = RESULT_MAX_BYTES_DEFAULT
    """Largest result a step may store. Defaults to 10 MiB."""
    prepare: bool = True
    """Server-side prepared statements on the service's own connections (never on step
    sessions, which run tenants' code). Off behind a connection pooler that cannot keep them
    (PgBouncer before 1.21 in transaction mode). Defaults to True."""
    log_format: str = "text"
    """text or json. Defaults to text."""
    metrics_port: int | None = None
    """Port for Prometheus metrics, or None. Defaults to None."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics port listens on. Defaults to 127.0.0.1 (this host only)."""
    ui_port: int | None = None
    """Port of the web dashboard (``pgdurable ui``) run beside the workers, or None.
    Defaults to None."""
    ui_dsn: str = ""
    """The dashboard's login: it shows and does what this role may (never the service
    role). Required with ``ui_port``."""
    ui_host: str = "127.0.0.1"
    """Address the dashboard listens on. Defaults to 127.0.0.1 (this host only)."""
    ui_read_only: bool = False
    """The dashboard hides and refuses every action. Defaults to False."""
    ui_token: str | None = None
    """Token the dashboard requires on every request, or None. Defaults to None."""

    def validate(self) -> ServeConfig:
        if not self.dsn:
            raise ConfigError("dsn: a PostgreSQL connection string is required")
        if not self.step_dsn:
            raise ConfigError("step_dsn: the step sessions' connection string is required")
        if self.workers < 1:
            raise ConfigError(f"workers: must be at least 1, got {self.workers!r}")
        if self.slots < 1:
            raise ConfigError(f"slots: must be at least 1, got {self.slots!r}")
        if self.lease_seconds < 2:
            raise ConfigError(f"lease_seconds: must be at least 2, got {self.lease_seconds!r}")
        if self.http_policy not in ("deny-all", "public", "allow-list"):
            raise ConfigError(
                f"http_policy: must be deny-all, public or allow-list, got {self.http_policy!r}"
            )
        # the workers build their HTTP policy after fork; a bad combination must fail here,
        # once, not crash-loop every worker
        from .steps.http_step import HttpPolicy

        try:
            HttpPolicy.from_strings(self.http_policy, list(self.http_allow))
        except ConfigError as exc:
            raise ConfigError(f"http_policy/http_allow: {exc}") from None
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: must be text or json, got {self.log_format!r}")
        if self.ui_port is not None:
            if not self.ui_dsn:
                raise ConfigError(
                    "ui_dsn: the dashboard (ui_port) needs the login of the role "
                    "whose runs it shows"
                )
            if self.metrics_port == self.ui_port:
                raise ConfigError(f"ui_port: {self.ui_port} is the metrics port too")
        return self
