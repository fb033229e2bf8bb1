"""The recurring-job commands of the ``pgdurable`` CLI: ``schedule``, ``unschedule``,
``schedules``, ``pause-schedule`` and ``resume-schedule`` (wrapping df.schedule and friends,
schema part 60_schedules.sql). Registered on :data:`pgdurable.cli.main` when that module loads.
"""

from __future__ import annotations

import click

from .cli_common import _db, _emit, _table, _ts, dsn_option, json_option, main
from .sanitize import visible

__all__: list[str] = []


@main.command()
@dsn_option
@click.argument("name")
@click.argument("cron")
@click.argument("expr")
@click.option(
    "--overlap",
    type=click.Choice(["skip", "queue", "allow"]),
    default="skip",
    help="while the previous run is still going: skip the slot, queue it, or start anyway",
)
@json_option
def schedule(dsn: str | None, name: str, cron: str, expr: str, overlap: str, as_json: bool) -> None:
    """Create or replace the recurring job NAME: EXPR (a DSL expression, as for `start`)
    started at each CRON slot (5-field cron, UTC), as you, labelled NAME."""
    with _db(dsn) as conn:
        conn.execute(f"select df.schedule(%s, %s, {expr}, %s)".encode(), (name, cron, overlap))
        row = conn.execute(
            "select next_run_at from df.list_schedules() where name = %s and owner = current_user",
            (name,),
        ).fetchone()
    if as_json:
        _emit({"name": name, "cron": cron, "overlap": overlap})
    else:
        click.echo(
            visible(
                f"scheduled {name} ({cron}, overlap {overlap})"
                + (
                    ""
                    if row and row[0]
                    else "; a running serve computes its next run within seconds"
                )
            )
        )


@main.command()
@dsn_option
@click.argument("name")
@json_option
def unschedule(dsn: str | None, name: str, as_json: bool) -> None:
    """Delete your recurring job NAME (its past runs stay)."""
    _toggle(dsn, "unschedule", name, as_json, "unscheduled")


@main.command(name="pause-schedule")
@dsn_option
@click.argument("name")
@json_option
def pause_schedule(dsn: str | None, name: str, as_json: bool) -> None:
    """Pause your recurring job NAME (no runs until resumed)."""
    _toggle(dsn, "pause_schedule", name, as_json, "paused")


@main.command(name="resume-schedule")
@dsn_option
@click.argument("name")
@json_option
def resume_schedule(dsn: str | None, name: str, as_json: bool) -> None:
    """Resume your recurring job NAME from its next slot (paused slots are not caught up)."""
    _toggle(dsn, "resume_schedule", name, as_json, "resumed")


def _toggle(dsn: str | None, fn: str, name: str, as_json: bool, done: str) -> None:
    with _db(dsn) as conn:
        row = conn.execute(f"select df.{fn}(%s)".encode(), (name,)).fetchone()
    found = bool(row and row[0])
    if as_json:
        _emit({"name": name, "found": found})
    elif found:
        click.echo(visible(f"{done} {name}"))
    if not found:
        raise click.ClickException(
            visible(f"no recurring job named {name!r} of yours (pgdurable schedules lists them)")
        )


@main.command()
@dsn_option
@json_option
def schedules(dsn: str | None, as_json: bool) -> None:
    """List your recurring jobs (df.list_schedules): next and last run, runs, failures."""
    with _db(dsn) as conn:
        cur = conn.execute("select * from df.list_schedules()")
        names = [d.name for d in cur.description or []]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    if as_json:
        _emit(
            {
                "schedules": [
                    {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()}
                    for r in rows
                ]
            }
        )
        return
    click.echo(
        _table(
            [
                "NAME",
                "CRON",
                "STATE",
                "NEXT RUN (UTC)",
                "LAST RUN",
                "LAST",
                "STATUS",
                "RUNS",
                "FAILED",
                "OWNER",
            ],
            [
                [
                    r["name"],
                    r["cron"],
                    "on" if r["enabled"] else "paused",
                    _ts(r["next_run_at"]),
                    _ts(r["last_run_at"]),
                    r["last_instance_id"] or "",
                    r["last_status"] or ("start failed" if r["last_error"] else ""),
                    str(r["runs"]),
                    str(r["failures"]),
                    r["owner"],
                ]
                for r in rows
            ],
        )
    )
