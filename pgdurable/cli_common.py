"""What every ``pgdurable`` CLI module shares: the command group (:data:`main`, with its
one-line error handling), the ``--dsn`` / ``--json`` options, the connection helper and the
output helpers (exact JSON, sanitised tables). pgdurable/cli.py defines the core commands,
pgdurable/cli_schedules.py and pgdurable/cli_ui.py more; each imports from here, so no
command module imports another.

Tenants' text is shown through :func:`pgdurable.sanitize.visible` (tables) or as ASCII-only
JSON (``--json``): no control or escape sequence of a tenant reaches the terminal.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import orjson
import psycopg
from psycopg.types.json import set_json_loads

from .embedded import EmbeddedPostgres, default_data_dir
from .sanitize import visible
from .values import json_text, loads, number_text

__all__ = ["CONTEXT", "Problem", "dsn_option", "json_option", "main"]

CONTEXT = {"auto_envvar_prefix": "PGDURABLE", "show_default": True}
# --json output: types JSON has no word for go through _json_default (as their text)
_PASSTHROUGH = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_NON_STR_KEYS
)


def _dsn_or_embedded(dsn: str | None, data_dir: str | None = None, *, start: bool = False) -> str:
    """``dsn``, or the embedded PostgreSQL's. Only ``demo`` and ``serve`` start the embedded
    server (``start``); any other command without a DSN asks for one when it is not running,
    rather than silently starting a server the user stopped."""
    if dsn:
        return dsn
    emb = EmbeddedPostgres(default_data_dir() if data_dir is None else Path(data_dir).absolute())
    if not start and not (emb.data_dir.exists() and emb.is_running()):
        raise click.ClickException(
            f"no --dsn given (nor PGDURABLE_DSN) and the embedded PostgreSQL in {emb.data_dir} "
            "is not running: give --dsn, or start it with `make demo` or `make serve`"
        )
    out = emb.start()
    click.echo(f"embedded PostgreSQL 18 running at {out} (data: {emb.data_dir})", err=True)
    return out


dsn_option = click.option(
    "--dsn",
    envvar="PGDURABLE_DSN",
    show_envvar=True,
    help="PostgreSQL connection string of the df database (none: the embedded PostgreSQL 18)",
)


def _note_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:  # errors of this command are printed as JSON too (_Main.invoke)
        ctx.meta["pgdurable.json"] = True
    return value


json_option = click.option(
    "--json", "as_json", is_flag=True, callback=_note_json, help="print JSON (errors too)"
)


def _env(name: str) -> list[str]:
    """Options' variables are named PGDURABLE_<OPTION> (docs/operating.md); click's automatic
    PGDURABLE_<COMMAND>_<OPTION> is accepted too (flag > env > default either way)."""
    return [f"PGDURABLE_{name}", f"PGDURABLE_SERVE_{name}"]


def _hint(exc: psycopg.Error) -> str | None:
    """What to do about a database error a user can cause: PostgreSQL's own hint, else ours."""
    diag_hint = exc.diag.message_hint if exc.diag else None
    if diag_hint:
        return diag_hint
    msg = (exc.diag.message_primary if exc.diag else None) or str(exc)
    if isinstance(exc, psycopg.OperationalError):
        return (
            "check --dsn (or PGDURABLE_DSN): is the server up, the database name right, and "
            "this user allowed in by pg_hba.conf?"
        )
    if isinstance(exc, psycopg.errors.InsufficientPrivilege) and re.search(
        r'schema "?df"?|function df\.', msg
    ):
        return (
            "an administrator must give this role the df API: select df.grant_usage('<role>')"
            " (add include_http => true for df.http)"
        )
    if isinstance(
        exc, psycopg.errors.InvalidSchemaName | psycopg.errors.UndefinedFunction
    ) and re.search(r"\bdf\b", msg):
        return (
            "pgdurable is not installed in this database: an administrator runs "
            "`pgdurable install --dsn ...`"
        )
    return None


class Problem(click.ClickException):
    """An ordinary failure, with what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class _Main(click.Group):
    """The command group: an ordinary failure (a database error, a refused connection, a port
    in use) is one line naming the problem and, where there is one, what to do, with exit code
    1, never a traceback; with --json the error is a JSON object on stdout."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["pgdurable.argv"] = list(args)  # --json, even when parsing fails later
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except click.UsageError as exc:
            if not _json_wanted(ctx):
                raise
            _fail(ctx, exc.format_message(), None, exc.exit_code)
        except click.ClickException as exc:
            _fail(ctx, exc.format_message(), getattr(exc, "hint", None), exc.exit_code)
        except psycopg.Error as exc:
            msg = (exc.diag.message_primary if exc.diag else None) or str(exc).strip()
            _fail(ctx, msg.splitlines()[0] if msg else type(exc).__name__, _hint(exc), 1)
        except OSError as exc:  # a port in use, a file that cannot be written
            _fail(ctx, str(exc), None, 1)
        return None


def _json_wanted(ctx: click.Context) -> bool:
    return bool(ctx.meta.get("pgdurable.json")) or "--json" in ctx.meta.get("pgdurable.argv", ())


def _fail(ctx: click.Context, message: str, hint: str | None, code: int) -> None:
    if _json_wanted(ctx):
        click.echo(_json_text({"error": message} | ({"hint": hint} if hint else {})))
    else:
        click.echo(f"Error: {visible(message)}", err=True)
        if hint:
            click.echo(f"Hint: {visible(hint)}", err=True)
    ctx.exit(code)


@click.group(cls=_Main, context_settings=CONTEXT)
def main() -> None:
    """pgdurable: durable execution for PostgreSQL (the pg_durable df API)."""


def _connect(dsn: str | None) -> psycopg.Connection[Any]:
    try:
        conn = psycopg.connect(
            _dsn_or_embedded(dsn), autocommit=True, application_name="pgdurable cli"
        )
    except psycopg.OperationalError as exc:
        # the last line is the server's reason (the first names the address tried)
        reason = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()] or [""]
        raise Problem(f"cannot connect: {reason[-1]}", _hint(exc)) from exc
    # json/jsonb columns parsed exactly (numbers keep every digit and their scale)
    set_json_loads(loads, conn)
    return conn


@contextlib.contextmanager
def _db(dsn: str | None) -> Iterator[psycopg.Connection[Any]]:
    """A connection; a database error reaches _Main, which prints it as one line with a hint
    (exit code 1)."""
    with _connect(dsn) as conn:
        yield conn


def _scalar(dsn: str | None, query: str, params: tuple[Any, ...]) -> Any:
    with _db(dsn) as conn:
        row = conn.execute(query.encode(), params).fetchone()
        return row[0] if row else None


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(number_text(value))  # every digit, the scale kept
    return str(value)  # a timestamp, …


def _json_text(data: Any) -> str:
    """JSON text of CLI output: numbers exactly as PostgreSQL's jsonb keeps them, anything
    else that is not JSON (a timestamp, …) as its text, and ASCII only (every other
    character as a \\u escape, as JSON allows) so no control or bidi character of a
    tenant's text reaches the terminal."""
    try:
        text = orjson.dumps(data, default=_json_default, option=_PASSTHROUGH).decode()
    except TypeError:  # nested deeper than orjson's 254 levels
        text = json_text(data)
    return text if text.isascii() and "\x7f" not in text else _NOT_ASCII.sub(_u_escape, text)


# orjson escapes the C0 controls itself; these are the rest (DEL, C1, bidi, all non-ASCII)
_NOT_ASCII = re.compile("[\x7f-\U0010ffff]")


def _u_escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    if c > 0xFFFF:  # a surrogate pair, as JSON spells it
        c -= 0x10000
        return f"\\u{0xD800 | c >> 10:04x}\\u{0xDC00 | c & 0x3FF:04x}"
    return f"\\u{c:04x}"


def _emit(data: Any) -> None:
    click.echo(_json_text(data))


def _as_json(text: str | None) -> Any:
    """A JSON text column as a value, numbers exact (text that does not parse stays a
    string)."""
    if text is None:
        return None
    try:
        return loads(text)
    except ValueError:
        return text


def _ts(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain left-aligned table (two spaces between columns), one line per row: every cell
    is shown with its control characters escaped."""
    rows = [[visible(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
