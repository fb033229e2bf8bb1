"""The verifier's use of pgdurable's own features that needs a client's part: starts made
twice with one idempotency key, and df.restart of the failed ``restart`` instances after their
fix (the ``retry`` kinds need none: they are only templates, :mod:`.workload`). Kept apart from
:mod:`.run`, which calls them from its pump and settle phases."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING

import psycopg

from .workload import LABEL_PREFIX, fix_for_restart

if TYPE_CHECKING:
    from .run import Run


def keyed_start(run: Run, expr: str, label: str, key: str) -> str | None:
    """Start one instance by two df.start calls with one idempotency key, one after the
    other or (half the time) from two threads at once; a call that fails mid-way is
    repeated (up to 3 times), as a client of an idempotent API does. Every call's answer
    goes to :attr:`keyed` (None: it never got one); the id, if any call got one."""
    got: list[str | None] = [None, None]
    barrier = threading.Barrier(2)

    def call(i: int, together: bool) -> None:
        if together:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=5)
        for attempt in range(4):
            try:
                with run.connect(tenant=True) as conn:
                    got[i] = conn.execute(
                        f"select df.start({expr}, %s, idempotency_key => %s)", (label, key)
                    ).fetchone()[0]  # type: ignore[index]
                return
            except psycopg.OperationalError:
                time.sleep(0.2 * (attempt + 1))

    if run.rng.random() < 0.5:
        threads = [threading.Thread(target=call, args=(i, True)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        run.stats.features["keyed starts (concurrent)"] += 1
    else:
        call(0, False)
        call(1, False)
        run.stats.features["keyed starts (one after the other)"] += 1
    run.keyed[key] = got
    return got[0] or got[1]


def restart_failed(run: Run) -> int:
    """Fix and restart every failed ``restart`` instance that has had one run only (its
    missing table created, then df.restart as the tenant that started it): how many were
    restarted. A call that fails mid-way is judged again by the next call (its run count)."""
    done = 0
    try:
        with run.connect() as admin:
            rows = admin.execute(
                "select i.id, i.label from df.instances i where i.label like %s and "
                "i.status = 'failed' and (select count(*) from df.instance_runs(i.id)) = 1",
                (LABEL_PREFIX + "restart:%",),
            ).fetchall()
            for iid, label in rows:
                fix_for_restart(admin, int(label.rsplit(":", 1)[1]), run.tenant)
                with run.connect(tenant=True) as conn:
                    conn.execute("select df.restart(%s)", (iid,))
                run.restarted.add(iid)
                run.ids.setdefault(iid, "restart")
                done += 1
    except psycopg.Error as exc:
        if not isinstance(exc, psycopg.OperationalError):
            raise
    run.stats.features["restarts called"] += done
    return done
