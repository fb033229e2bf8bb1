"""The pgdurable exception tree.

::

    PgDurableError
    ├── ConfigError          a setting is invalid (names the field)
    └── StepError            a step failed; the message is what users see in df.nodes.result
        ├── SubstitutionError  a $ref / {var} could not be substituted
        ├── ResultTooLarge     a step's result exceeds the configured cap
        └── HttpStepError      an HTTP step failed (policy, transport, 5xx, caps)

psycopg errors are not wrapped in general: a step statement's error becomes a
:class:`StepError` carrying PostgreSQL's primary message verbatim and its SQLSTATE (the
worker does this where it runs the step, pgdurable/worker/dispatch.py); errors of the
engine's own statements stay psycopg errors, and the CLI and the dashboard show them with
PostgreSQL's hint. Install problems an administrator must fix raise
``pgdurable.roles.InstallError``, naming the statement to run.

Messages are lower-case where we write them and name the offending object with repr.
"""

from __future__ import annotations


class PgDurableError(Exception):
    """Base of every pgdurable error."""

    __module__ = "pgdurable"


class ConfigError(PgDurableError):
    """A configuration value is invalid."""

    __module__ = "pgdurable"


class StepError(PgDurableError):
    """A step failed; ``str(err)`` is stored as the failed node's result."""

    __module__ = "pgdurable"

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class SubstitutionError(StepError):
    """A ``$ref`` or ``{var}`` could not be substituted into a step."""

    __module__ = "pgdurable"


class ResultTooLarge(StepError):
    """A step's result is larger than the configured cap."""

    __module__ = "pgdurable"


class HttpStepError(StepError):
    """An HTTP step failed: blocked by policy, transport error, 5xx or a size cap."""

    __module__ = "pgdurable"

    retry_after: float | None = None
    """Seconds the server asked to wait (a 5xx's or 429's Retry-After header), else None: an
    enclosing df.retry waits at least that long before the next attempt."""
