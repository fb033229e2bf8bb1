"""The dashboard's settings and the names its app and views share (pgdurable/ui/app.py,
pgdurable/ui/views.py both import from here, never from each other's module top)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from pgdurable.errors import ConfigError

__all__ = ["CSRF_COOKIE", "HERE", "LOOPBACK_NAMES", "TOKEN_COOKIE", "UiConfig", "is_loopback"]

CSRF_COOKIE = "pgdurable_ui_csrf"
TOKEN_COOKIE = "pgdurable_ui_session"
HERE = Path(__file__).resolve().parent

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


@dataclass(frozen=True)
class UiConfig:
    """Settings of ``pgdurable ui`` (and of ``serve --ui-port``)."""

    dsn: str
    """Connection string; the dashboard shows and does what this login's role may."""
    host: str = "127.0.0.1"
    """Address to listen on. Defaults to 127.0.0.1 (this host only)."""
    port: int = 8080
    """TCP port. Defaults to 8080."""
    read_only: bool = False
    """Hide and refuse every action (cancel, signal, restart, start)."""
    token: str | None = None
    """When set, every request must present it (for access from other hosts)."""

    def validate(self) -> UiConfig:
        if not self.dsn:
            raise ConfigError("ui dsn: a PostgreSQL connection string is required")
        if not 0 < self.port < 65536:
            raise ConfigError(f"ui port: must be 1-65535, got {self.port!r}")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError(
                "ui token: use at least 16 characters (e.g. the output of "
                "`python -c 'import secrets; print(secrets.token_urlsafe())'`)"
            )
        return self

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
