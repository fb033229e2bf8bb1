"""``pgdurable verify``: a crash verifier for pgdurable's guarantees (docs/reliability.md).

On a scratch database (by default an embedded PostgreSQL 18 in a temporary directory, so the
tool may restart the server; with ``--dsn`` a scratch database on that server, PostgreSQL
restarts skipped and reported as such) it runs ``pgdurable serve`` as a subprocess and a mixed
workload while injecting faults at random points, lets every instance finish, then checks the
database and prints a report whose last line is ``violations: N``.

The package, one piece per module:

    workload  the workflow kinds and the scratch database's ledger table
    run       the fault run (serve, the HTTP endpoint, faults, the soak watch, settling)
    network   the network faults between serve and PostgreSQL (one proxy per serve)
    proxy     the PostgreSQL wire-protocol TCP proxy those faults go through
    watch     who holds the connections (the soak watch), takeovers in serve's logs
    checker   the violations the database and the run's records show
    report    the printed table

:func:`main` is what the CLI calls; the names tests use are re-exported here.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pgdurable import harness

from .checker import KINDS, TERMINAL, SentSignal, Stats, Violation, check
from .network import NET_KINDS
from .proxy import Proxy
from .report import render
from .run import FAULT_KINDS, LEASE_SECONDS, Run
from .watch import HOLDERS, holder_of
from .workload import (
    KIND_WEIGHTS,
    LABEL_PREFIX,
    LEDGER,
    LEDGER_RE,
    LOOP_TOTALS,
    setup_database,
    templates,
)

__all__ = [
    "FAULT_KINDS",
    "HOLDERS",
    "KINDS",
    "KIND_WEIGHTS",
    "LABEL_PREFIX",
    "LEASE_SECONDS",
    "LEDGER",
    "LEDGER_RE",
    "LOOP_TOTALS",
    "NET_KINDS",
    "TERMINAL",
    "Proxy",
    "Run",
    "SentSignal",
    "Stats",
    "Violation",
    "check",
    "holder_of",
    "main",
    "render",
    "setup_database",
    "templates",
]


def main(
    faults: int,
    duration: float,
    seed: int | None,
    dsn: str | None,
    keep: bool,
    echo: Any,
    *,
    serves: int = 1,
    kinds: tuple[str, ...] = FAULT_KINDS,
) -> int:
    """Run the verifier; print the table; return the number of violations. ``serves``: how
    many serves share the database (1 or 2); ``kinds``: the fault kinds injected."""
    if not harness.have_psutil():
        raise RuntimeError("pgdurable verify needs psutil (pip install 'pgdurable[test]')")
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
    workdir = Path(tempfile.mkdtemp(prefix="pgdurable-verify-"))
    run = Run(faults, duration, seed, dsn, workdir, echo, serves=serves, kinds=kinds)
    echo(
        f"pgdurable verify: seed {seed}, up to {faults} faults in {duration:.0f}s, "
        f"{serves} serve(s), work dir {workdir}",
        err=True,
    )
    violations: list[Violation] = []
    crashed: BaseException | None = None
    try:
        run.setup()
        violations = run.run()
    except BaseException as exc:
        crashed = exc
        raise
    finally:
        # a run that could not finish keeps its evidence and still prints what it measured
        keep_it = keep or bool(violations) or crashed is not None
        if crashed is not None:
            run.stats.notes.append(f"the run did not finish: {crashed!r}")
            echo(render(run.stats, violations, seed), err=True)
        run.teardown(keep_it)
        if keep_it:
            run.stats.notes.append(
                f"evidence kept in {workdir} (serve.log, pg18/ data dir, database {run.dbname})"
            )
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    echo(render(run.stats, violations, seed))
    return len(violations)
