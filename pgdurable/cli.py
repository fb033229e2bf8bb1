"""The ``pgdurable`` command line (click). Every option has a ``PGDURABLE_*`` env var.

Admin tooling: this module may spell SQL for the df functions it wraps (the runtime's SQL
is in pgdurable/sql/queries.sql).

Labels, results, errors and the like are tenants' text: every human-format output passes
through :func:`pgdurable.sanitize.visible` (controls and escape sequences shown, not sent),
field by field, so a newline cannot add a row and an escape cannot reach the terminal.
``--json`` output is left as it is: JSON escapes control characters itself.

The command group and the helpers every command module shares are pgdurable/cli_common.py;
the instance commands (start, status, list, explain, top, …) pgdurable/cli_instances.py, the
recurring-job commands pgdurable/cli_schedules.py, restart pgdurable/cli_restart.py, the
dashboard pgdurable/cli_ui.py.
"""

from __future__ import annotations

import logging
import os
import sys

import click
import psycopg

from . import DF_API_LEVEL, __version__
from . import schema as schema_mod
from .cli_common import (
    _dsn_or_embedded,
    _emit,
    _env,
    dsn_option,
    json_option,
    main,
)
from .config import (
    LEASE_SECONDS_DEFAULT,
    RESULT_MAX_BYTES_DEFAULT,
    SLOTS_DEFAULT,
    WORKERS_DEFAULT,
    ServeConfig,
)
from .errors import ConfigError
from .sanitize import visible


@main.command()
@json_option
def version(as_json: bool) -> None:
    """Print the package version, the df API level and the scheduler implementation."""
    from .graph import sched

    if as_json:
        _emit({"version": __version__, "df_api": DF_API_LEVEL, "scheduler": sched.__impl__})
        return
    click.echo(f"pgdurable {__version__} (df API {DF_API_LEVEL}; scheduler: {sched.__impl__})")


@main.command()
@dsn_option
@click.option(
    "--operator-schema",
    show_envvar=True,
    help="schema for the seven operators (default: pg_catalog as superuser, else public)",
)
def install(dsn: str | None, operator_schema: str | None) -> None:
    """Create (or upgrade) the df schema and the engine schema."""
    try:
        res = schema_mod.install(_dsn_or_embedded(dsn), operator_schema=operator_schema)
    except schema_mod.InstallError as exc:
        raise click.ClickException(str(exc)) from None
    how = (
        "installed"
        if res.from_version == 0
        else "up to date"
        if not res.changed
        else f"upgraded from {res.from_version}"
    )
    click.echo(
        f"pgdurable schema version {res.to_version} ({how}); operators in {res.operator_schema}"
    )
    if res.new_mode_problem:
        # caller mode works; 'new' needs what the message names (an administrator's statement)
        click.echo(f"WARNING: {visible(res.new_mode_problem)}", err=True)
    else:
        click.echo(f"transaction_mode 'new' ready (dblink in schema {res.dblink_schema})")


@main.command()
@dsn_option
def upgrade(dsn: str | None) -> None:
    """Apply pending schema migrations."""
    try:
        res = schema_mod.install(_dsn_or_embedded(dsn))
    except schema_mod.InstallError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"pgdurable schema version {res.to_version}"
        + (f" (from {res.from_version})" if res.changed else " (nothing to do)")
    )


@main.command()
@dsn_option
@click.confirmation_option(prompt="drop the df schema and every instance in it?")
def uninstall(dsn: str | None) -> None:
    """Drop df, the engine schema and the operators."""
    schema_mod.uninstall(_dsn_or_embedded(dsn))
    click.echo("pgdurable uninstalled")


@main.command()
@dsn_option
@click.option(
    "--workers",
    envvar=_env("WORKERS"),
    type=int,
    default=WORKERS_DEFAULT,
    show_envvar=True,
    help="worker processes",
)
@click.option(
    "--slots",
    envvar=_env("SLOTS"),
    type=int,
    default=SLOTS_DEFAULT,
    show_envvar=True,
    help="concurrent steps per worker",
)
@click.option(
    "--lease-seconds",
    envvar=_env("LEASE_SECONDS"),
    type=int,
    default=LEASE_SECONDS_DEFAULT,
    show_envvar=True,
    help="lease of a claimed step",
)
@click.option(
    "--http-policy",
    envvar=_env("HTTP_POLICY"),
    type=click.Choice(["deny-all", "public", "allow-list"]),
    default="public",
    show_envvar=True,
    help="HTTP egress policy",
)
@click.option(
    "--http-allow",
    envvar=_env("HTTP_ALLOW"),
    multiple=True,
    show_envvar=True,
    help="host pattern admitted under allow-list (repeatable; env: comma separated)",
)
@click.option(
    "--metrics-port",
    envvar=_env("METRICS_PORT"),
    type=int,
    default=None,
    show_envvar=True,
    help="serve Prometheus metrics on this port (/metrics)",
)
@click.option(
    "--metrics-host",
    envvar=_env("METRICS_HOST"),
    default="127.0.0.1",
    show_envvar=True,
    help="address the metrics port listens on (0.0.0.0: every "
    "interface, for a scraper on another host)",
)
@click.option(
    "--log-format",
    envvar=_env("LOG_FORMAT"),
    type=click.Choice(["text", "json"]),
    default="text",
    show_envvar=True,
)
@click.option(
    "--result-max-bytes",
    envvar=_env("RESULT_MAX_BYTES"),
    type=int,
    default=RESULT_MAX_BYTES_DEFAULT,
    show_envvar=True,
    help="largest result a step may store; a larger one fails the step",
)
@click.option(
    "--prepare/--no-prepare",
    envvar=_env("PREPARE"),
    default=True,
    show_envvar=True,
    help="server-side prepared statements on the service's connections (--no-prepare "
    "behind a pooler that cannot keep them, e.g. PgBouncer before 1.21 in transaction mode)",
)
@click.option(
    "--step-dsn",
    envvar=_env("STEP_DSN"),
    show_envvar=True,
    help="connection string of the step sessions, as pgdurable_step (default: "
    "--dsn with that user; passwords from ~/.pgpass)",
)
@click.option(
    "--data-dir",
    envvar=_env("DATA_DIR"),
    show_envvar=True,
    help="embedded PostgreSQL data directory",
)
@click.option(
    "--ui-port",
    envvar="PGDURABLE_SERVE_UI_PORT",
    type=int,
    default=None,
    show_envvar=True,
    help="also run the web dashboard (pgdurable ui) on this port",
)
@click.option(
    "--ui-dsn",
    envvar="PGDURABLE_UI_DSN",
    show_envvar=True,
    help="the dashboard's login: it shows and does what this role may (default: "
    "--dsn, unless that is pgdurable_service)",
)
@click.option(
    "--ui-host",
    envvar="PGDURABLE_UI_HOST",
    default="127.0.0.1",
    show_envvar=True,
    help="address the dashboard listens on",
)
@click.option(
    "--ui-read-only",
    envvar="PGDURABLE_UI_READ_ONLY",
    is_flag=True,
    show_envvar=True,
    help="the dashboard hides and refuses every action",
)
@click.option(
    "--ui-token",
    envvar="PGDURABLE_UI_TOKEN",
    show_envvar=True,
    default=None,
    help="the dashboard requires this token on every request",
)
def serve(
    dsn: str | None,
    workers: int,
    slots: int,
    lease_seconds: int,
    http_policy: str,
    http_allow: tuple[str, ...],
    metrics_port: int | None,
    metrics_host: str,
    log_format: str,
    result_max_bytes: int,
    prepare: bool,
    step_dsn: str | None,
    data_dir: str | None,
    ui_port: int | None,
    ui_dsn: str | None,
    ui_host: str,
    ui_read_only: bool,
    ui_token: str | None,
) -> None:
    """Run the executor: install/upgrade the schema, fork workers, run workflows.

    --dsn should log in as pgdurable_service. Given another role (an administrator, as in
    development with trust authentication), serve uses it only to install or upgrade the
    schema, then logs in as pgdurable_service: no session of the service is ever that
    administrator, and tenants' statements run only in sessions of pgdurable_step.
    """
    from . import log
    from .roles import check_logins, service_dsns
    from .worker.supervisor import supervise

    log.setup(log_format)
    allow: list[str] = []
    for item in http_allow:
        allow += [p.strip() for p in item.split(",") if p.strip()]
    given = _dsn_or_embedded(dsn, data_dir, start=True)
    try:
        res = schema_mod.install(given)
    except schema_mod.InstallError as exc:
        raise click.ClickException(str(exc)) from None
    service, step = service_dsns(given, step_dsn)
    try:
        config = ServeConfig(
            dsn=service,
            step_dsn=step,
            workers=workers,
            slots=slots,
            lease_seconds=lease_seconds,
            http_policy=http_policy,
            http_allow=tuple(allow),
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            log_format=log_format,
            result_max_bytes=result_max_bytes,
            prepare=prepare,
            ui_port=ui_port,
            ui_dsn=ui_dsn or given,
            ui_host=ui_host,
            ui_read_only=ui_read_only,
            ui_token=ui_token or None,
        ).validate()
        check_logins(config.dsn, config.step_dsn)
        if config.ui_port is not None:
            from .ui.app import check_serve_ui

            check_serve_ui(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    logging.getLogger("pgdurable").info("schema version %d ready", res.to_version)
    sys.exit(supervise(config))


@main.command()
@dsn_option
@click.option("--data-dir", help="embedded PostgreSQL data directory")
@click.option(
    "--role",
    default="pgdurable_demo",
    show_default=True,
    help="the tour's role (made if missing; not a superuser)",
)
def demo(dsn: str | None, data_dir: str | None, role: str) -> None:
    """Run serve and a sample workflow (SQL, a join, a condition, a sleep) to completion,
    and set up the README tour's role and tables."""
    from . import demo as demo_mod

    target = _dsn_or_embedded(dsn, data_dir, start=True)
    try:
        ok = demo_mod.run(target, role=role, embedded=not dsn, echo=click.echo)
    except (psycopg.Error, schema_mod.InstallError) as exc:
        msg = getattr(getattr(exc, "diag", None), "message_primary", None) or str(exc).strip()
        raise click.ClickException(visible(msg)) from None
    if not ok:
        sys.exit(1)


@main.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run the benchmark harness (python -m bench; a source checkout's bench/). --help for more."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "harness.py").exists():
        raise click.ClickException(
            "the benchmark harness ships with the source tree "
            "(bench/), not with the installed package"
        )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    os.chdir(root)
    os.execve(sys.executable, [sys.executable, "-m", "bench", *args], env)


@main.command()
@dsn_option
@click.option("--faults", type=int, default=200, help="faults to inject")
@click.option("--duration", type=float, default=900.0, help="seconds the fault phase may last")
@click.option("--seed", type=int, default=None, help="random seed (printed; for reproducing)")
@click.option(
    "--keep", is_flag=True, help="keep the work dir and database (kept anyway on violations)"
)
@click.option(
    "--serves",
    type=click.IntRange(1, 2),
    default=1,
    show_default=True,
    help="serve processes on the same database, each through its own proxy",
)
@click.option(
    "--kinds",
    default=None,
    metavar="KIND,...",
    help="only these fault kinds (comma-separated; default: all)",
)
def verify(
    dsn: str | None,
    faults: int,
    duration: float,
    seed: int | None,
    keep: bool,
    serves: int,
    kinds: str | None,
) -> None:
    """Crash verifier: a mixed workload under random faults, then check the guarantees
    docs/reliability.md lists. Without --dsn: an embedded PostgreSQL 18 of its own
    (restarted as a fault). Last line: `violations: N`; exit code 1 when N > 0."""
    from . import verify as verify_mod

    chosen: tuple[str, ...] = verify_mod.FAULT_KINDS
    if kinds is not None:
        chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
        bad = [k for k in chosen if k not in verify_mod.FAULT_KINDS]
        if bad or not chosen:
            raise click.BadParameter(
                f"unknown fault kind(s) {', '.join(bad) or '(none given)'}; the kinds are "
                + ", ".join(verify_mod.FAULT_KINDS),
                param_hint="--kinds",
            )
    n = verify_mod.main(faults, duration, seed, dsn, keep, click.echo, serves=serves, kinds=chosen)
    sys.exit(1 if n else 0)


# the instance, recurring-job, restart and dashboard (`ui`) commands live in modules of their own;
# importing them registers them
from . import cli_instances, cli_restart, cli_schedules, cli_ui  # noqa: E402,F401
