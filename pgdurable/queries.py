"""Named queries with the engine schema filled in: the only place runtime SQL comes from."""

from __future__ import annotations

from functools import cache
from typing import LiteralString

from .sql import query


@cache
def q(name: str, engine: str = "pgdurable") -> LiteralString:
    """The named query of queries.sql for the given engine schema."""
    # engine is validated as an identifier by the config; the text is our own file
    return query(name).replace("@engine@", engine)
