"""Peers in the same invocation (docs/performance.md, Targets): DBOS Transact and Procrastinate.

``python -m bench --peers dbos,procrastinate`` runs W1-W3 (the ones in ``--workloads``,
sized exactly like pgdurable's: ``workloads.workloads(args.scale)``) against each peer on
the same PostgreSQL server, each workload in a fresh database of its own
(``pgdurable_peer_<peer>_<w>``), and returns one :class:`PeerRow` per workload. Both are
the ``bench`` extra (``pip install -e '.[bench]'``); a peer that is not importable is
reported as *not installed*, never quoted from elsewhere.

Isolation: each (peer, workload) runs in a driver subprocess (``python -m bench.peers
drive SPEC``) started in a session of its own; the driver starts the peer's worker
processes (``python -m bench.peers worker SPEC``). DBOS is a process-wide singleton, and
neither peer's globals, threads or event loops touch the harness. The harness kills the
driver's whole process group when it overruns (``--timeout`` for the drain plus an
enqueue allowance) and reports "timed out" in the row's note; errors and stalls (no
leaf step finished for ``--stall-seconds``) are notes too, never exceptions.

Method, as for pgdurable: enqueue everything with no worker running, then start the
workers and wait until every instance is done. steps/s = leaf steps executed / drain
window, both read back from the peer's own tables afterwards (one run per workload:
docs/performance.md's peer table is a median of 3, so rerun before quoting a figure):

  DBOS 3.4     steps = the ``select1`` transaction's checkpoints in
               ``dbos.operation_outputs`` (one per executed leaf step); window = first
               workflow dequeued
               (min ``workflow_status.started_at_epoch_ms``) → last workflow finished
               (max ``completed_at``/``updated_at``).
  Procrastinate steps = leaf jobs with ``status = 'succeeded'``; window = first
  3.10         ``started`` event → last ``succeeded`` event in ``procrastinate_events``.

Workloads:
  W1  DBOS: ``n`` workflows enqueued with ``DBOSClient.enqueue`` on queue ``bench``;
      each calls one step, a datasource transaction (``@ds.transaction``, the DBOS 3.x
      successor of ``@DBOS.transaction``, which 3.0 removed with the application
      database) running ``select 1`` through DBOS's SQLAlchemy engine.
      Procrastinate: ``n`` jobs (``batch_defer_async``); the task body runs
      ``select 1`` on the app's psycopg pool (``connector.execute_query_one_async``).
  W2  DBOS: one workflow calling the ``select 1`` transaction 10 times in sequence.
      Procrastinate: a chain: the task runs ``select 1`` and, below step 10, defers
      the next step of the same chain before it returns.
  W3  DBOS: a parent workflow (queue ``bench``) enqueues 100 child workflows on queue
      ``leaves`` (each: the ``select 1`` transaction), waits for every handle's result,
      then runs the transaction once more: 101 leaf steps.
      Procrastinate: a ``fanout`` job per instance inserts a join-counter row
      (``bench_join.remaining = 100``) and batch-defers 100 leaf jobs; each leaf runs
      ``select 1``, then ``update bench_join set remaining = remaining - 1 ...
      returning remaining``; the one that reaches 0 defers the ``final`` step (``select
      1``): 101 leaf steps. Procrastinate has no join, so this counter is the join; the
      decrement and the final defer are two transactions (a crash between them would
      lose the final step: acceptable in a benchmark, not in production).
      The parent/fanout jobs are not counted as steps (pgdurable's join nodes are not).

Tuning for 2 cores (docs/performance.md's "each tuned for 2 cores"), the same for both peers:
2 worker processes x 8 concurrent workflows/jobs (16 in flight), matching pgdurable's
``serve`` default of 2 worker processes; one Python process cannot use both cores.
  DBOS: ``worker_concurrency=8`` per queue per process, distinct ``executor_id`` per
  process (so launch-time recovery never re-runs another process's workflows), one
  ``application_version``, ``polling_interval_sec=0.05`` (DBOS queues are polled,
  not notified; the default 1 s caps a process at 8 dequeues/s per queue: W1 at 500
  workflows did 16 steps/s at 1 s, 65 at 0.2 s, 83 at 0.05 s, 80 at 0.01 s), datasource
  transactions at READ COMMITTED (the default SERIALIZABLE only adds SSI cost to a
  ``select 1``), pools of 12 (system) + 8 (datasource) connections per process, logging
  at WARNING.
  Procrastinate: ``run_worker_async(concurrency=8)`` async tasks, LISTEN/NOTIFY on
  (the default), ``delete_jobs="never"`` (the default; the jobs are the step count), a
  psycopg pool of 12 per process.

Over 500 lines: one driver per peer (DBOS, Procrastinate) with its W1-W3 workloads,
its worker entry and the subprocess isolation they share; a split would scatter one peer
across files.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .workloads import workloads

KNOWN = {"dbos": "dbos", "procrastinate": "procrastinate"}
PEER_WORKLOADS = ("W1", "W2", "W3")
ROOT = Path(__file__).resolve().parents[1]

PROCS = 2  # worker processes per peer
CONCURRENCY = 8  # in-flight workflows / jobs per worker process
DBOS_POLL_S = 0.05  # DBOS queue polling interval (default 1.0)
DBOS_VERSION_TAG = "pgdurable-bench"
ENQUEUE_ALLOWANCE_S = 300.0  # setup + enqueue, on top of the drain timeout
FANOUT = 100  # W3's fan-out width (workloads.join_tree of 100 leaves)
SEQ = 10  # W2's sequence length


@dataclass
class PeerRow:
    """One peer x workload figure; ``steps_per_s`` 0 means not measured (see ``note``)."""

    peer: str
    workload: str
    steps_per_s: float = 0.0
    note: str = ""


# -- harness side ---------------------------------------------------------------------


def _sizes(scale: float, wanted: set[str]) -> list[tuple[str, int, int]]:
    """(workload, instances, leaf steps per instance), exactly pgdurable's sizes."""
    return [
        (w.name, w.instances, w.steps_per_instance)
        for w in workloads(scale, "")
        if w.name in PEER_WORKLOADS and w.name in wanted
    ]


def run(name: str, server: Any, args: Any, progress: Any) -> list[PeerRow]:
    module = KNOWN.get(name.lower())
    if module is None:
        return [PeerRow(name, "-", 0.0, f"unknown peer (known: {', '.join(KNOWN)})")]
    if importlib.util.find_spec(module) is None:
        return [PeerRow(name, "-", 0.0, "not installed (pip install -e '.[bench]')")]
    peer = name.lower()
    wanted = {w.strip().upper() for w in getattr(args, "workloads", "W1,W2,W3").split(",")}
    sizes = _sizes(args.scale, wanted)
    if not sizes:
        return [PeerRow(peer, "-", 0.0, "none of W1–W3 in --workloads")]
    version = _version(module)
    rows = []
    for workload, instances, steps_each in sizes:
        progress(
            f"[peer {peer} {version}] {workload}: {instances:,} instances × "
            f"{steps_each} steps, {PROCS} processes × {CONCURRENCY}"
        )
        dbname = f"pgdurable_peer_{peer}_{workload.lower()}"
        try:
            dsn = server.fresh_db(dbname)
            res = measure(
                peer,
                workload,
                dsn,
                instances,
                timeout=args.timeout,
                stall=args.stall_seconds,
                tick=progress.tick,
            )
        except Exception as exc:  # a peer's failure is a note, never the harness's crash
            res = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            if not getattr(args, "keep", False):
                server.drop_db(dbname)
        rows.append(peer_row(peer, version, workload, instances, steps_each, res))
        progress(
            f"  [peer {peer}] {workload}: {rows[-1].steps_per_s:,.0f} steps/s ({rows[-1].note})"
        )
    return rows


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "?"


def peer_row(
    peer: str, version: str, workload: str, instances: int, steps_each: int, res: dict[str, Any]
) -> PeerRow:
    expected = instances * steps_each
    if "error" in res and not res.get("steps"):
        return PeerRow(peer, workload, 0.0, f"{peer} {version}: {res['error']}")
    steps, drain = int(res.get("steps", 0)), float(res.get("drain_s", 0.0))
    # a run that did not finish is not measured (its counts are in the note)
    sps = steps / drain if drain > 0 and steps and not res.get("error") else 0.0
    parts = [
        f"{peer} {version}, {res.get('done', 0):,}/{instances:,} instances, "
        f"{steps:,}/{expected:,} steps, drain {drain:.2f} s, "
        f"enqueue {res.get('enqueue_s', 0):.2f} s, {PROCS}×{CONCURRENCY}"
    ]
    if res.get("error"):
        parts.append(str(res["error"]))
    if steps != expected and not res.get("error"):
        parts.append("step count differs from expected")
    return PeerRow(peer, workload, sps, "; ".join(parts))


def measure(
    peer: str,
    workload: str,
    dsn: str,
    instances: int,
    *,
    timeout: float = 1800,
    stall: float = 60,
    tick: Any = None,
) -> dict[str, Any]:
    """Run one (peer, workload) in a driver subprocess against the (fresh) database ``dsn``.

    Returns the driver's figures: ``steps`` (read back from the peer's tables), ``done``
    instances, ``drain_s``, ``enqueue_s``, ``failed``, and ``error`` when it did not
    finish; a timeout kills the driver's process group (its workers included).
    """
    spec = {
        "peer": peer,
        "workload": workload,
        "dsn": dsn,
        "instances": instances,
        "timeout": timeout,
        "stall": stall,
        "procs": PROCS,
        "concurrency": CONCURRENCY,
    }
    fd, log_name = tempfile.mkstemp(prefix=f"pgdurable-peer-{peer}-{workload}-", suffix=".log")
    with open(fd, "wb") as log:  # the driver's (and its workers') stderr
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.peers", "drive", json.dumps(spec)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            text=True,
        )
    result: dict[str, Any] = {}

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("@result "):
                result.update(json.loads(line[len("@result ") :]))
            elif line.startswith("@progress ") and tick is not None:
                tick(line[len("@progress ") :].rstrip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    limit = timeout + ENQUEUE_ALLOWANCE_S
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(proc)  # the driver is alive: its group is its workers and itself
        result.setdefault("error", f"timed out after {limit:.0f} s (driver killed)")
    except BaseException:
        _kill_group(proc)
        raise
    # (workers outliving a driver that died anyway exit on their own: _orphan_watch)
    reader.join(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()
    if not result:
        tail = Path(log_name).read_text(errors="replace").strip().splitlines()[-3:]
        result["error"] = (
            f"driver exited {proc.returncode} without a result: " + " | ".join(tail)
        )[:400]
    else:
        Path(log_name).unlink(missing_ok=True)
    return result


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


# -- driver side (python -m bench.peers drive SPEC) -----------------------------------


def _url(dsn: str) -> str:
    """A libpq DSN as a ``postgresql://`` URL (SQLAlchemy, hence DBOS, only takes URLs)."""
    if dsn.startswith(("postgresql://", "postgres://")):
        return dsn
    from urllib.parse import quote, urlencode

    import psycopg

    info = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items()}
    user, password = info.pop("user", ""), info.pop("password", "")
    host, port, dbname = info.pop("host", ""), info.pop("port", ""), info.pop("dbname", "")
    if host.startswith("/"):  # a Unix socket directory goes in the query
        info["host"], host = host, ""
    auth = (
        quote(user, safe="") + (":" + quote(password, safe="") if password else "") + "@"
        if user
        else ""
    )
    netloc = auth + host + (f":{port}" if port else "")
    query = ("?" + urlencode(info)) if info else ""
    return f"postgresql://{netloc}/{quote(dbname, safe='')}{query}"


def _say(msg: str) -> None:
    print("@progress " + msg, flush=True)


class Peer:
    """One peer's setup, enqueue, worker and read-back (all inside the driver process)."""

    leaf_total: str  # SQL: leaf steps executed so far
    done_sql: str  # SQL: (instances done, instances failed)

    def __init__(self, workload: str, dsn: str) -> None:
        self.workload, self.dsn = workload, dsn

    def setup(self) -> None: ...
    def enqueue(self, n: int) -> None: ...
    def window(self, conn: Any) -> float: ...


class Dbos(Peer):
    top: ClassVar[dict[str, str]] = {"W1": "bench_w1", "W2": "bench_w2", "W3": "bench_w3"}
    # each executed step's checkpoint (the datasource's own checkpoint rows are swept)
    leaf_total = (
        "select count(*) from dbos.operation_outputs "
        "where function_name = 'select1' and error is null"
    )

    @property
    def done_sql(self) -> str:
        return (
            "select count(*) filter (where status = 'SUCCESS'), "
            "count(*) filter (where status in ('ERROR', 'CANCELLED', "
            "'MAX_RECOVERY_ATTEMPTS_EXCEEDED')) "
            f"from dbos.workflow_status where name = '{self.top[self.workload]}'"
        )

    def setup(self) -> None:
        from dbos import DBOS, DBOSClient, SQLAlchemyDatasource

        DBOS.migrate(_url(self.dsn))
        SQLAlchemyDatasource.migrate(_url(self.dsn))
        client = DBOSClient(system_database_url=_url(self.dsn))
        try:
            for q in ("bench", "leaves"):
                client.register_queue(
                    q, worker_concurrency=CONCURRENCY, polling_interval_sec=DBOS_POLL_S
                )
        finally:
            client.destroy()

    def enqueue(self, n: int) -> None:
        from dbos import DBOSClient

        client = DBOSClient(system_database_url=_url(self.dsn))
        try:
            opts: Any = {
                "workflow_name": self.top[self.workload],
                "queue_name": "bench",
                "app_version": DBOS_VERSION_TAG,
            }
            for i in range(n):
                client.enqueue(opts)
                if i % 500 == 0:
                    _say(f"  enqueue {i:,}/{n:,}")
        finally:
            client.destroy()

    def window(self, conn: Any) -> float:
        row = conn.execute(
            "select min(started_at_epoch_ms), max(coalesce(completed_at, updated_at)) "
            "from dbos.workflow_status where status = 'SUCCESS'"
        ).fetchone()
        return max(0.0, (row[1] - row[0]) / 1000) if row and row[0] else 0.0


class Procrastinate(Peer):
    leaves: ClassVar[dict[str, tuple[str, ...]]] = {
        "W1": ("bench_step",),
        "W2": ("bench_seq",),
        "W3": ("bench_leaf", "bench_final"),
    }

    @property
    def leaf_total(self) -> str:  # type: ignore[override]
        names = ", ".join(f"'{t}'" for t in self.leaves[self.workload])
        return (
            f"select count(*) from procrastinate_jobs where task_name in ({names}) "
            "and status = 'succeeded'"
        )

    @property
    def done_sql(self) -> str:  # type: ignore[override]
        # an instance is done when its last leaf succeeded
        last = {
            "W1": "task_name = 'bench_step'",
            "W2": f"task_name = 'bench_seq' and (args->>'k')::int = {SEQ}",
            "W3": "task_name = 'bench_final'",
        }[self.workload]
        return (
            "select count(*) filter (where status = 'succeeded' and "
            f"{last}), count(*) filter (where status in ('failed', 'aborted')) "
            "from procrastinate_jobs"
        )

    def setup(self) -> None:
        import psycopg

        app = _procrastinate_app(self.dsn, pool=2)
        with app.open():
            app.schema_manager.apply_schema()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("create table bench_join (id bigint primary key, remaining int)")

    def enqueue(self, n: int) -> None:
        app = _procrastinate_app(self.dsn, pool=2)
        task, make = {
            "W1": ("bench_step", lambda i: {"i": i}),
            "W2": ("bench_seq", lambda i: {"inst": i, "k": 1}),
            "W3": ("bench_fanout", lambda i: {"inst": i}),
        }[self.workload]
        with app.open():
            t = app.tasks[task]
            for lo in range(0, n, 1000):
                t.batch_defer(*[make(i) for i in range(lo, min(n, lo + 1000))])
                _say(f"  enqueue {min(n, lo + 1000):,}/{n:,}")

    def window(self, conn: Any) -> float:
        row = conn.execute(
            "select extract(epoch from min(at) filter (where type = 'started')), "
            "extract(epoch from max(at) filter (where type = 'succeeded')) "
            "from procrastinate_events"
        ).fetchone()
        return max(0.0, float(row[1] - row[0])) if row and row[0] else 0.0


PEERS: dict[str, type[Peer]] = {"dbos": Dbos, "procrastinate": Procrastinate}


def _drive(spec: dict[str, Any]) -> dict[str, Any]:
    import psycopg

    peer = PEERS[spec["peer"]](spec["workload"], spec["dsn"])
    n = int(spec["instances"])
    out: dict[str, Any] = {"instances": n}
    peer.setup()
    t0 = time.monotonic()
    peer.enqueue(n)
    out["enqueue_s"] = time.monotonic() - t0
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(int(spec["procs"])):
            wspec = dict(spec, index=i)
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.peers", "worker", json.dumps(wspec)],
                    cwd=ROOT,
                    stdout=sys.stderr,
                    stderr=sys.stderr,
                )
            )
        t0 = time.monotonic()
        deadline = t0 + float(spec["timeout"])
        last, moved = -1, t0
        with psycopg.connect(spec["dsn"], autocommit=True) as conn:
            while True:
                steps = int(conn.execute(peer.leaf_total).fetchone()[0])  # type: ignore[index]
                done, failed = conn.execute(peer.done_sql).fetchone()  # type: ignore[misc]
                now = time.monotonic()
                _say(
                    f"  [{spec['peer']} {spec['workload']}] {done:,}/{n:,} instances, "
                    f"{steps:,} steps ({now - t0:.1f} s)"
                )
                if steps != last:
                    last, moved = steps, now
                if done + failed >= n:
                    break
                dead = [w.returncode for w in workers if w.poll() is not None]
                if dead:
                    out["error"] = f"a worker process exited ({dead[0]})"
                    break
                if now - moved > float(spec["stall"]):
                    out["error"] = f"stalled: no step finished for {spec['stall']:.0f} s"
                    break
                if now > deadline:
                    out["error"] = f"timed out: drain over {spec['timeout']:.0f} s"
                    break
                time.sleep(0.2)
            out["wall_s"] = time.monotonic() - t0
            _stop(workers)
            out["steps"] = int(conn.execute(peer.leaf_total).fetchone()[0])  # type: ignore[index]
            out["done"], out["failed"] = (int(x) for x in conn.execute(peer.done_sql).fetchone())  # type: ignore[union-attr]
            out["drain_s"] = peer.window(conn)
            if out["failed"] and "error" not in out:
                out["error"] = f"{out['failed']} instance(s)/job(s) failed"
    finally:
        _stop(workers)
    return out


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.terminate()
    for w in workers:
        try:
            w.wait(timeout=15)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


# -- worker side (python -m bench.peers worker SPEC) ----------------------------------


def _orphan_watch() -> None:
    """Exit when the driver that started us is gone (it stops us itself otherwise)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _dbos_worker(spec: dict[str, Any]) -> None:
    import sqlalchemy as sa
    from dbos import DBOS, SQLAlchemyDatasource

    url = _url(spec["dsn"])
    DBOS(
        config={
            "name": "pgdurable-bench",
            "system_database_url": url,
            "application_version": DBOS_VERSION_TAG,
            "executor_id": f"bench-{spec['index']}",
            "sys_db_pool_size": 12,
            "log_level": "WARNING",
        }
    )
    ds = SQLAlchemyDatasource.create(
        url, engine_kwargs={"pool_size": 8, "max_overflow": 0}, run_migrations=False
    )

    @ds.transaction(name="select1", isolation_level="READ COMMITTED")
    def select1() -> int:
        return int(ds.sql_session().execute(sa.text("select 1")).scalar_one())

    @DBOS.workflow(name="bench_w1")
    def w1() -> int:
        return select1()

    @DBOS.workflow(name="bench_w2")
    def w2() -> int:
        return sum(select1() for _ in range(SEQ))

    @DBOS.workflow(name="bench_leaf")
    def leaf() -> int:
        return select1()

    @DBOS.workflow(name="bench_w3")
    def w3() -> int:
        q = DBOS.retrieve_queue("leaves")
        assert q is not None
        handles = [q.enqueue(leaf) for _ in range(FANOUT)]
        total = sum(h.get_result() for h in handles)
        return total + select1()

    DBOS.launch()
    while True:  # the driver's SIGTERM ends us (default action) after the drain
        time.sleep(3600)


def _procrastinate_app(dsn: str, pool: int) -> Any:
    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=dsn, min_size=pool, max_size=pool)
    )

    async def select1() -> None:
        await app.connector.execute_query_one_async("select 1")

    @app.task(name="bench_step")
    async def step(i: int) -> None:
        await select1()

    @app.task(name="bench_seq")
    async def seq(inst: int, k: int) -> None:
        await select1()
        if k < SEQ:
            await seq.defer_async(inst=inst, k=k + 1)

    @app.task(name="bench_fanout")
    async def fanout(inst: int) -> None:
        await app.connector.execute_query_async(
            "insert into bench_join (id, remaining) values (%(inst)s, %(n)s)", inst=inst, n=FANOUT
        )
        await leaf.batch_defer_async(*[{"inst": inst}] * FANOUT)

    @app.task(name="bench_leaf")
    async def leaf(inst: int) -> None:
        await select1()
        row = await app.connector.execute_query_one_async(
            "update bench_join set remaining = remaining - 1 where id = %(inst)s "
            "returning remaining",
            inst=inst,
        )
        if row["remaining"] == 0:
            await final.defer_async(inst=inst)

    @app.task(name="bench_final")
    async def final(inst: int) -> None:
        await select1()

    return app


def _procrastinate_worker(spec: dict[str, Any]) -> None:
    import asyncio

    app = _procrastinate_app(spec["dsn"], pool=int(spec["concurrency"]) + 4)

    async def main() -> None:
        async with app.open_async():
            await app.run_worker_async(
                concurrency=int(spec["concurrency"]),
                name=f"bench-{spec['index']}",
                wait=True,
                delete_jobs="never",
                shutdown_graceful_timeout=5,
            )

    asyncio.run(main())


def main(argv: list[str]) -> int:
    role, spec = argv[0], json.loads(argv[1])
    if role == "worker":
        _orphan_watch()
        {"dbos": _dbos_worker, "procrastinate": _procrastinate_worker}[spec["peer"]](spec)
        return 0
    try:
        out = _drive(spec)
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    print("@result " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
