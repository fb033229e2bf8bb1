"""The ``pgdurable ui`` command: the web dashboard (pgdurable/ui). Registered on
:data:`pgdurable.cli.main` when that module loads.

Every option has a ``PGDURABLE_UI_*`` environment variable. Without ``--dsn`` it serves the
embedded PostgreSQL of ``make demo`` as the tour's role (``pgdurable_demo``), never as its
superuser.
"""

from __future__ import annotations

import click

from .cli_common import _dsn_or_embedded, main
from .errors import ConfigError

__all__: list[str] = []


@main.command()
@click.option(
    "--dsn",
    envvar="PGDURABLE_UI_DSN",
    show_envvar=True,
    help="connection string of the role whose runs the dashboard shows and acts on "
    "(none: the embedded PostgreSQL of make demo, as its tour role)",
)
@click.option(
    "--host",
    envvar="PGDURABLE_UI_HOST",
    default="127.0.0.1",
    show_envvar=True,
    help="address to listen on (0.0.0.0: every interface; give --token then)",
)
@click.option(
    "--port", envvar="PGDURABLE_UI_PORT", type=int, default=8080, show_envvar=True, help="TCP port"
)
@click.option(
    "--read-only",
    envvar="PGDURABLE_UI_READ_ONLY",
    is_flag=True,
    show_envvar=True,
    help="show runs, hide and refuse every action",
)
@click.option(
    "--token",
    envvar="PGDURABLE_UI_TOKEN",
    show_envvar=True,
    default=None,
    help="require this token on every request (open /?token=… once)",
)
def ui(dsn: str | None, host: str, port: int, read_only: bool, token: str | None) -> None:
    """Run the web dashboard: runs by label, each run's graph live, cancel, signal, start,
    and the system's workers and throughput. Everything is read and done as the DSN's role
    (row-level security decides what it sees); the browser never gets a credential."""
    try:
        from .ui.app import check_login, port_free, serve_forever
        from .ui.base import UiConfig, is_loopback
    except ImportError as exc:
        raise click.ClickException(
            f"the dashboard needs the ui extra ({exc.name} is missing): pip install 'pgdurable[ui]'"
        ) from None
    if not dsn:
        from .demo import TOUR_ROLE, tour_dsn

        dsn = tour_dsn(_dsn_or_embedded(None), TOUR_ROLE)
    try:
        config = UiConfig(
            dsn=dsn, host=host, port=port, read_only=read_only, token=token or None
        ).validate()
        role = check_login(config.dsn)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if not port_free(host, port):
        raise click.ClickException(
            f"port {port} on {host} is in use (another dashboard? "
            "`make demo` leaves one running): choose --port"
        )
    if not is_loopback(host) and not token:
        click.echo(
            f"WARNING: listening on {host} without --token: anyone who reaches this "
            f"port acts as {role}",
            err=True,
        )
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    click.echo(
        f"pgdurable ui: http://{shown}:{port}/ as role {role}"
        + (" (read-only)" if read_only else "")
        + ("; open it once with ?token=<token>" if token else ""),
        err=True,
    )
    serve_forever(config)
