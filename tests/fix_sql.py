"""SQL test helpers and tenant fixtures shared by tests/sql and tests/acceptance.

Helpers (plain functions, imported by the tests):

- :func:`one`: the first column of a statement's first row;
- :func:`mkrole`: a uniquely named role given ``df.grant_usage`` (or not), as the connected
  user (inside ``tx`` it vanishes with the rollback);
- :func:`become`: ``SET LOCAL ROLE`` (for the rest of the transaction);
- :func:`new_user`: both, the usual start of a tests/sql test.

Fixtures (loaded by tests/conftest.py):

- ``user``: a fresh role with df usage that ``tx`` has become;
- ``tenant``: a LOGIN role with df usage in the test's ``db`` (``db.create_role``).
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.fix_db import TestDB

Conn = psycopg.Connection[Any]


def one(conn: Conn, query: Any, params: Any = (), *, strict: bool = False) -> Any:
    """The first column of the first row; None when there is no row (``strict``: fail)."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        assert not strict, f"no row from {query!r}"
        return None
    return row[0]


def mkrole(
    conn: Conn,
    prefix: str = "r",
    *,
    grant: bool = True,
    http: bool = False,
    with_grant: bool = False,
    login: bool = True,
) -> str:
    """Create ``<prefix>_<8 hex>`` (LOGIN unless ``login=False``) and, when ``grant``, give it
    ``df.grant_usage(role, include_http => http, with_grant => with_grant)``."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    conn.execute(
        sql.SQL("create role {} {}").format(
            sql.Identifier(name), sql.SQL("login" if login else "nologin")
        )
    )
    if grant:
        conn.execute("select df.grant_usage(%s, %s, %s)", (name, http, with_grant))
    return name


def become(conn: Conn, role: str) -> None:
    """SET LOCAL ROLE: the rest of the transaction runs as ``role``."""
    conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))


def new_user(conn: Conn, prefix: str = "u", **kw: Any) -> str:
    """:func:`mkrole` (``kw``: its options), then :func:`become` it; the role's name."""
    role = mkrole(conn, prefix, **kw)
    become(conn, role)
    return role


@pytest.fixture
def user(tx: Conn) -> str:
    """A fresh role with df usage (no HTTP) that ``tx`` has become."""
    return new_user(tx)


@pytest.fixture
def tenant(db: TestDB) -> str:
    """A LOGIN role with df usage (no HTTP) in the test's database, dropped afterwards."""
    return db.create_role("tenant")
