"""The ``pgdurable restart ID`` command: df.restart, then what it began (schema part
70_restart.sql, docs/restart.md). Registered on :data:`pgdurable.cli.main` when that module
loads.
"""

from __future__ import annotations

from typing import Any

import click

from .cli_common import Problem, _db, _emit, dsn_option, json_option, main
from .sanitize import visible

__all__: list[str] = []


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        text = str(error.get("error") or "")
        where = error.get("node_id")
        return f"{text} (node {where})" if where else text
    return "" if error is None else str(error)


@main.command()
@dsn_option
@click.argument("instance_id")
@json_option
def restart(dsn: str | None, instance_id: str, as_json: bool) -> None:
    """Restart a failed or cancelled instance from where it stopped: its completed steps keep
    their results and do not run again; the failed, cancelled and never-run steps run."""
    with _db(dsn) as conn:
        row = conn.execute("select to_regprocedure('df.restart(text)') is not null").fetchone()
        if not (row and row[0]):
            raise Problem(
                "this database's pgdurable schema has no df.restart (it is older than "
                "schema version 5)",
                "upgrade it: pgdurable install --dsn ... (serve upgrades it when it starts)",
            )
        # one transaction: the runs as the restart left them (a worker may end run 2 at once)
        with conn.transaction():
            conn.execute("select df.restart(%s)", (instance_id,))
            runs = conn.execute(
                "select run, status, started_at, ended_at, error from df.instance_runs(%s)",
                (instance_id,),
            ).fetchall()
    current, previous = runs[-1], (runs[-2] if len(runs) > 1 else None)
    if as_json:
        _emit(
            {
                "instance_id": instance_id,
                "run": current[0],
                "status": current[1],
                "previous": None
                if previous is None
                else {"run": previous[0], "status": previous[1], "error": previous[4]},
            }
        )
        return
    line = f"Instance {instance_id} restarted: run {current[0]} is {current[1]}"
    if previous is not None:
        line += f"; run {previous[0]} {previous[1]}: {_error_text(previous[4])}"
    click.echo(visible(line))
