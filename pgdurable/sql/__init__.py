"""SQL kept in files: the schema parts, the migrations and the named queries.

``schema/*.sql`` is the current schema (a fresh install applies it); ``migrations/<n>-<n+1>.sql``
upgrade an installed one. ``baseline/`` and ``released.sha256`` are the project's record of
released versions, for its tests only: they do not ship, and nothing here reads them
(docs/schema-changes.md).

``queries.sql`` holds every query the runtime executes, each introduced by a
``-- name: <name>`` line followed by a one-line purpose comment; :func:`query`
returns one by name. Nothing else in the runtime spells SQL.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import LiteralString

SQL_DIR = Path(__file__).parent
SCHEMA_DIR = SQL_DIR / "schema"
MIGRATIONS_DIR = SQL_DIR / "migrations"

_NAME_RE = re.compile(r"^-- name: ([a-z_0-9]+)\s*$", re.MULTILINE)


@cache
def _queries() -> dict[str, str]:
    text = (SQL_DIR / "queries.sql").read_text() if (SQL_DIR / "queries.sql").exists() else ""
    parts = _NAME_RE.split(text)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        out[name] = body.strip()
    return out


def query(name: str) -> LiteralString:
    """Return the named query from queries.sql (KeyError names the missing query)."""
    try:
        # the text comes from our own package file, never from input
        return _queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in pgdurable/sql/queries.sql") from None


def schema_parts() -> list[Path]:
    """The schema files in the order they are applied."""
    return sorted(SCHEMA_DIR.glob("*.sql"))
