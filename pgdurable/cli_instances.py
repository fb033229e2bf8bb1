"""The instance commands of the ``pgdurable`` CLI: start, status/result/error/info/nodes,
await, signal, cancel, list, explain and top (the df functions they wrap, as the role of the
DSN). Registered on :data:`pgdurable.cli_common.main` when pgdurable/cli.py imports this module.

Labels, results and errors are tenants' text: every human-format output passes through
:func:`pgdurable.sanitize.visible`, field by field (pgdurable/cli.py says why).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import click
import psycopg
from psycopg.rows import dict_row

from . import diagram
from .cli_common import (
    _as_json,
    _connect,
    _db,
    _dsn_or_embedded,
    _emit,
    _json_text,
    _scalar,
    _table,
    _ts,
    dsn_option,
    json_option,
    main,
)
from .sanitize import visible, visible_lines

INSTANCE_ID = re.compile(r"^[0-9a-f]{8}$")


@main.command()
@dsn_option
@click.argument("expr")
@click.option("--label", default=None, help="label stored with the instance")
@click.option(
    "--idempotency-key",
    default=None,
    help="start at most one instance per key: again with the same key prints the first one's id",
)
@json_option
def start(
    dsn: str | None, expr: str, label: str | None, idempotency_key: str | None, as_json: bool
) -> None:
    """Start EXPR (a DSL expression, e.g. "df.sql('select 1') ~> 'select 2'"); print the id.

    EXPR is SQL text evaluated as `SELECT df.start(EXPR)`: a quoted SQL string
    ('select 1') auto-wraps into one SQL step.
    """
    with _db(dsn) as conn:
        row = conn.execute(
            f"select df.start({expr}, %s, idempotency_key => %s)".encode(), (label, idempotency_key)
        ).fetchone()
    iid = row[0] if row else None
    if as_json:
        _emit({"instance_id": iid, "label": label})
    else:
        click.echo(visible(iid or ""))


def _instance_command(name: str, doc: str, key: str, parse: bool) -> None:
    @main.command(name=name, help=doc)
    @dsn_option
    @click.argument("instance_id")
    @json_option
    def _cmd(dsn: str | None, instance_id: str, as_json: bool) -> None:
        with _db(dsn) as conn:
            row = conn.execute(
                f"select df.{name}(%s), df.status(%s)".encode(), (instance_id, instance_id)
            ).fetchone()
        assert row is not None
        out, status = row
        if status is None:
            raise click.ClickException(f"instance {instance_id!r} not found or access denied")
        if name == "result" and out is None:
            why = (
                "failed: `pgdurable error " + instance_id + "` says why"
                if status == "failed"
                else "was cancelled"
                if status == "cancelled"
                else f"is {status}: there is no result yet"
            )
            raise click.ClickException(f"instance {instance_id} {why}")
        text = out
        if isinstance(out, str) and parse:
            out = _as_json(out)
        if as_json:
            _emit(
                {"instance_id": instance_id, key: out}
                | ({"status": status} if key != "status" else {})
            )
        elif out is not None:
            # a JSON string bare; other JSON as PostgreSQL wrote it (its digits as stored)
            click.echo(
                visible(
                    out
                    if isinstance(out, str)
                    else text
                    if isinstance(text, str)
                    else _json_text(out)
                )
            )


_instance_command(
    "status",
    "Print df.status(INSTANCE_ID): pending, running, completed, failed or cancelled.",
    "status",
    False,
)
_instance_command(
    "result",
    "Print df.result(INSTANCE_ID): the root result (JSON) of a "
    "completed instance, nothing otherwise.",
    "result",
    True,
)
_instance_command(
    "error",
    "Print df.error(INSTANCE_ID): {node_id, node_type, error, sqlstate} "
    "of a failed instance, nothing otherwise.",
    "error",
    False,
)


@main.command(name="await")
@dsn_option
@click.argument("instance_id")
@click.option("--timeout", type=int, default=30, help="seconds to wait")
@json_option
def await_(dsn: str | None, instance_id: str, timeout: int, as_json: bool) -> None:
    """Wait for the instance to finish; print its status (completed, failed or cancelled).

    Exit code 0 when it completed, 1 when it failed or was cancelled (or on an error, such as
    the timeout passing)."""
    status = _scalar(dsn, "select df.await_instance(%s, %s)", (instance_id, timeout))
    if as_json:
        _emit({"instance_id": instance_id, "status": status})
    else:
        click.echo(visible(status))
    if status != "completed":
        sys.exit(1)


@main.command()
@dsn_option
@click.argument("instance_id")
@click.argument("name")
@click.argument("data", required=False, default="{}")
@json_option
def signal(dsn: str | None, instance_id: str, name: str, data: str, as_json: bool) -> None:
    """Send signal NAME with DATA (JSON, else a JSON string) to an instance."""
    out = _scalar(dsn, "select df.signal(%s, %s, %s)", (instance_id, name, data))
    if as_json:
        _emit({"instance_id": instance_id, "signal": name, "result": out})
    else:
        click.echo(visible(out))


@main.command()
@dsn_option
@click.argument("instance_id")
@click.argument("reason", required=False, default="Cancelled by user")
@json_option
def cancel(dsn: str | None, instance_id: str, reason: str, as_json: bool) -> None:
    """Cancel an instance (and its running descendants)."""
    out = _scalar(dsn, "select df.cancel(%s, %s)", (instance_id, reason))
    if as_json:
        _emit({"instance_id": instance_id, "result": out})
    else:
        click.echo(visible(out))


@main.command(name="list")
@dsn_option
@click.option(
    "--status",
    default=None,
    help="only instances with this status",
    type=click.Choice(["pending", "running", "completed", "failed", "cancelled"]),
)
@click.option("--label", default=None, help="only instances with this label")
@click.option("--limit", type=click.IntRange(1), default=100, help="page size")
@click.option("--after", default=None, help="cursor printed by the previous page")
@json_option
def list_(
    dsn: str | None,
    status: str | None,
    label: str | None,
    limit: int,
    after: str | None,
    as_json: bool,
) -> None:
    """List instances (df.list_instances), newest first."""
    with _db(dsn) as conn:
        rows = conn.execute(
            "select instance_id, label, status, execution_count, created_at, completed_at,"
            " output, next_cursor from df.list_instances(%s, %s, %s, %s)",
            (status, limit, label, after),
        ).fetchall()
    cursor = rows[0][7] if rows else None
    if as_json:
        _emit(
            {
                "instances": [
                    {
                        "instance_id": r[0],
                        "label": r[1],
                        "status": r[2],
                        "execution_count": r[3],
                        "created_at": r[4].isoformat() if r[4] else None,
                        "completed_at": r[5].isoformat() if r[5] else None,
                        "output": _as_json(r[6]),
                    }
                    for r in rows
                ],
                "next_cursor": cursor,
            }
        )
        return
    click.echo(
        _table(
            ["ID", "STATUS", "EXECS", "CREATED", "COMPLETED", "LABEL"],
            [[r[0], r[2], str(r[3] or 0), _ts(r[4]), _ts(r[5]), r[1] or ""] for r in rows],
        )
    )
    if cursor:
        click.echo(f"(more: --after {cursor})")


_DSL_MARKERS = re.compile(
    r"\bdf\s*\.\s*(sql|seq|as|join|join3|race|if|if_rows|loop|break|sleep|wait_for_schedule"
    r"|wait_for_signal|http|http_multipart)\s*\(",
    re.IGNORECASE,
)


def _diagram_of(conn: psycopg.Connection[Any], target: str, text: str) -> diagram.Diagram:
    if INSTANCE_ID.match(target):
        inst = conn.execute(
            "select status, root_node from df.instances where id = %s", (target,)
        ).fetchone()
        if inst is None:
            raise click.ClickException(f"Instance not found or access denied: {target}")
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute("select * from df.instance_nodes(%s)", (target,)).fetchall()
        return diagram.from_rows(rows, inst[1], title=f"instance {target} ({inst[0]})")
    if text.startswith("Invalid durable function graph"):
        raise click.ClickException(visible(text))
    value: str | None = target
    if not target.lstrip().startswith("{") and (
        _DSL_MARKERS.search(target) or re.search(r"~>|\|=>|\?>|!>|^\s*@>", target)
    ):
        # the graph value itself (ARCHITECTURE §1), evaluated as the caller like df.explain
        row = conn.execute(f"select ({target.rstrip().rstrip(';')}\n)::text".encode()).fetchone()
        value = row[0] if row else None
    return diagram.from_graph(value or "", title="dry run (not started)")


@main.command()
@dsn_option
@click.argument("target")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "mermaid", "dot"]),
    default="text",
    help="text: df.explain's tree; mermaid/dot: a diagram coloured by status",
)
@json_option
def explain(dsn: str | None, target: str, fmt: str, as_json: bool) -> None:
    """Explain TARGET: an instance id (live, with statuses) or a DSL expression (dry run)."""
    with _db(dsn) as conn:
        try:
            text = conn.execute("select df.explain(%s)", (target,)).fetchone()[0]  # type: ignore[index]
        except psycopg.Error:
            if fmt == "text":
                raise
            text = ""  # the diagram does not depend on df.explain's rendering
        if fmt == "text" and not as_json:
            # df.explain escapes tenants' text itself (df._visible); this also covers a server
            # with an older schema: each line of the tree made visible, the tree's lines kept
            click.echo(visible_lines(text))
            return
        d = _diagram_of(conn, target, text)
    if as_json:
        body = text if fmt == "text" else diagram.mermaid(d) if fmt == "mermaid" else diagram.dot(d)
        _emit({"target": target, "format": fmt, "text": body, "graph": diagram.to_json(d)})
    else:
        # labels are made visible in diagram.label; the lines are the renderer's own
        click.echo(visible_lines(diagram.mermaid(d) if fmt == "mermaid" else diagram.dot(d)))


@main.command()
@dsn_option
@click.option("--once", is_flag=True, help="print one frame and exit")
@click.option("--interval", type=float, default=2.0, help="seconds between refreshes")
@click.option("--width", type=int, default=None, help="columns (default: the terminal's)")
@json_option
def top(dsn: str | None, once: bool, interval: float, width: int | None, as_json: bool) -> None:
    """Live view: instances by status, throughput, in-flight steps, workers, failures."""
    from . import top as top_mod

    if as_json:  # one snapshot as data
        with _db(dsn) as conn:
            _emit(top_mod.fetch(conn).to_json())
        return
    target = _dsn_or_embedded(dsn)
    try:
        top_mod.run(
            lambda: _connect(target), once=once, interval=interval, width=width, echo=click.echo
        )
    except psycopg.Error as exc:
        raise click.ClickException(exc.diag.message_primary or str(exc).strip()) from exc
