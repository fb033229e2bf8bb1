"""The verifier's checker: what a run recorded plus the database, read back as violations.

:func:`check` reads only the database (as a superuser: it reads the engine schema) and what the
tool recorded (signals sent, HTTP requests received), so tests feed it hand-written states
(tests/acceptance/test_verify.py) to prove it can fail. Violation kinds (:data:`KINDS`):

    not_terminal       an instance not completed/failed/cancelled after the settle phase
    unexpected_status  an instance not completed, except an HTTP-kind instance failed by an HTTP
                       node while the endpoint was cut
    duplicate_effect   a SQL step's ledger row more than once (or a loop's totals off)
    missing_effect     a completed SQL step without its ledger row
    phantom_effect     a ledger row of a step that is not completed (ran but not recorded)
    http_lost          a completed HTTP node with no request received
    http_key_changed   requests of one HTTP node with different Idempotency-Keys
    http_key_shared    two HTTP nodes sharing one Idempotency-Key
    signal_lost        a sent signal neither consumed by a wait nor left in the inbox
    signal_duplicated  a signal consumed twice (or consumed and still in the inbox)
    stuck_node         a node still 'running' in a terminal instance
    stuck_task         an engine task row left for a terminal instance
    retry_attempts     a df.retry that ran more attempts than allowed, or one that gave up
                       without failing the instance with df.error naming its attempts (a
                       ``retry_fail`` instance must end so; a ``retry`` one must complete)
    keyed_start        two instances for one idempotency key, or df.start calls with one key
                       that returned different ids (or an id that is not the key's instance)
    restart_runs       a ``restart`` instance with fewer than 2 runs in df.instance_runs (its
                       failing step cannot succeed before the run fixes it and restarts it)
    foreach_rows       a completed ``foreach`` instance whose FOREACH did not run each row's
                       body exactly once, in one child, completed: its result's row_count or
                       row order off, or its children not one per row number (each body's
                       ledger row is checked in its child by the rules above)

Also the run's records it reads and fills: :class:`SentSignal`, :class:`Violation`,
:class:`Stats`.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg

from .workload import (
    FOREACH_ROWS,
    LABEL_PREFIX,
    LEDGER,
    LEDGER_RE,
    LOOP_TOTALS,
    RETRY_FAIL_ATTEMPTS,
    RETRY_MAX_ATTEMPTS,
)

TERMINAL = ("completed", "failed", "cancelled")
KINDS = (
    "not_terminal",
    "unexpected_status",
    "duplicate_effect",
    "missing_effect",
    "phantom_effect",
    "http_lost",
    "http_key_changed",
    "http_key_shared",
    "signal_lost",
    "signal_duplicated",
    "stuck_node",
    "stuck_task",
    "retry_attempts",
    "keyed_start",
    "restart_runs",
    "foreach_rows",
)


@dataclass
class SentSignal:
    instance_id: str
    name: str
    token: str
    certain: bool = True  # False: the call failed mid-way; it may or may not have committed


@dataclass
class Violation:
    kind: str
    instance_id: str | None
    detail: str


@dataclass
class Stats:
    faults: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    steps: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    samples: list[tuple[float, float, int, int, int]] = field(default_factory=list)
    """Soak watch: (t seconds, worker RSS MB, connections to the db, dead tuples, kB)."""
    holders: list[Counter[str]] = field(default_factory=list)
    """Soak watch, one per sample: the connections to the db by holder (HOLDERS)."""
    features: Counter[str] = field(default_factory=Counter)
    """df.retry, idempotent starts, df.restart: what the run exercised of each."""


def check(
    conn: psycopg.Connection[Any],
    sent: list[SentSignal],
    http_requests: list[tuple[str, str | None]],
    *,
    http_cut: bool,
    label_prefix: str = LABEL_PREFIX,
    stats: Stats | None = None,
    keyed: dict[str, list[str | None]] | None = None,
) -> list[Violation]:
    """Every violation of the guarantees (docs/reliability.md) visible in the database
    (``conn``: a superuser session of the df database) for the instances labelled
    ``label_prefix<kind>:<n>``; ``keyed``: per idempotency key, the id each df.start call
    with it returned (None: the call got no answer)."""
    st = stats or Stats()
    out: list[Violation] = []
    inst = conn.execute(
        "select id, label, status from df.instances where label like %s", (label_prefix + "%",)
    ).fetchall()
    ids = [r[0] for r in inst]
    kind_of = {r[0]: r[1][len(label_prefix) :].split(":")[0] for r in inst}
    status_of = {r[0]: r[2] for r in inst}
    nodes: dict[str, list[tuple[str, str, str, str, Any]]] = defaultdict(list)
    for iid, nid, ntype, query, status, result in conn.execute(
        "select instance_id, id, node_type, query, status, result from df.nodes "
        "where instance_id = any(%s)",
        (ids,),
    ):
        nodes[iid].append((nid, ntype, query, status, result))
    ledger: dict[str, Counter[str]] = defaultdict(Counter)
    for iid, step, n in conn.execute(
        f"select instance, step, count(*) from public.{LEDGER} group by 1, 2"  # noqa: S608 (a constant)
    ):
        ledger[iid][step] = n
    tasks = dict(
        conn.execute(
            "select instance_id, count(*) from pgdurable.tasks "
            "where instance_id = any(%s) group by 1",
            (ids,),
        ).fetchall()
    )
    inbox: Counter[tuple[str, str]] = Counter()
    for iid, tok in conn.execute(
        "select instance_id, data->>'tok' from pgdurable.signals where instance_id = any(%s)",
        (ids,),
    ):
        inbox[(iid, tok)] += 1

    for iid in ids:
        status, kind = status_of[iid], kind_of[iid]
        st.statuses[status] += 1
        ns = nodes[iid]
        failed_http = [n for n in ns if n[3] == "failed" and n[1] in ("HTTP", "HTTP_MULTIPART")]
        if status not in TERMINAL:
            out.append(Violation("not_terminal", iid, f"{kind} instance still {status}"))
        elif kind == "retry_fail":
            pass  # it must fail: checked with its RETRY below
        elif status != "completed" and not (
            status == "failed" and kind == "http" and failed_http and http_cut
        ):
            errs = [f"{n[1]} {n[0]}: {json.dumps(n[4])[:160]}" for n in ns if n[3] == "failed"]
            out.append(Violation("unexpected_status", iid, f"{kind} {status}: {errs}"))
        if status in TERMINAL:
            for nid, ntype, _q, nstatus, _r in ns:
                if nstatus == "running":
                    out.append(Violation("stuck_node", iid, f"{ntype} node {nid} still running"))
            if tasks.get(iid):
                out.append(Violation("stuck_task", iid, f"{tasks[iid]} task row(s) left"))
        # side effects: exactly once per completed step, never for a step not completed
        tags: dict[str, str] = {}
        for _nid, ntype, query, nstatus, _r in ns:
            m = LEDGER_RE.search(query or "") if ntype == "SQL" else None
            if m:
                tags[m.group(1)] = nstatus
                if nstatus == "completed":
                    st.steps["sql steps completed"] += 1
        got = ledger.get(iid, Counter())
        for tag, nstatus in tags.items():
            if kind == "loop" and tag in LOOP_TOTALS:
                continue  # a loop body step runs once per iteration: totals checked below
            n = got.get(tag, 0)
            if nstatus == "completed" and n > 1:
                out.append(Violation("duplicate_effect", iid, f"step {tag} applied {n} times"))
            elif nstatus == "completed" and n == 0:
                out.append(Violation("missing_effect", iid, f"completed step {tag} has no row"))
            elif nstatus != "completed" and n > 0:
                out.append(
                    Violation(
                        "phantom_effect", iid, f"step {tag} is {nstatus} but applied {n} times"
                    )
                )
        for tag, want in LOOP_TOTALS.items() if kind == "loop" else ():
            n = got.get(tag, 0)
            if (status == "completed" and n != want) or n > want:
                out.append(
                    Violation(
                        "duplicate_effect" if n > want else "missing_effect",
                        iid,
                        f"loop step {tag} applied {n} times, expected {want}",
                    )
                )
        for tag, n in got.items():
            if tag not in tags and not (kind == "loop" and tag in LOOP_TOTALS):
                out.append(Violation("phantom_effect", iid, f"ledger row {tag} x{n}: no step"))
        # signals consumed by waits (tokens)
        for _nid, ntype, _q, nstatus, _result in ns:
            if ntype == "SIGNAL" and nstatus == "completed":
                st.steps["signal waits completed"] += 1

    label_of = {r[0]: r[1] for r in inst}
    out += check_features(conn, ids, kind_of, status_of, nodes, st, keyed or {}, label_of)

    # HTTP: at-least-once per completed node, one stable key per node, keys never shared
    by_path: dict[str, set[str | None]] = defaultdict(set)
    count_path: Counter[str] = Counter()
    for path, key in http_requests:
        by_path[path].add(key)
        count_path[path] += 1
    st.steps["http requests received"] += len(http_requests)
    st.steps["http nodes retried (>1 request)"] += sum(1 for n in count_path.values() if n > 1)
    owner_of_key: dict[str | None, str] = {}
    for path, keys in by_path.items():
        iid = path.strip("/").split("/")[0]
        if len(keys) > 1:
            out.append(Violation("http_key_changed", iid, f"{path}: keys {sorted(map(str, keys))}"))
        for key in keys:
            if key is None:
                out.append(Violation("http_key_changed", iid, f"{path}: no Idempotency-Key"))
            elif owner_of_key.setdefault(key, path) != path:
                out.append(
                    Violation(
                        "http_key_shared", iid, f"{path} and {owner_of_key[key]} share key {key}"
                    )
                )
    for iid in ids:
        for nid, ntype, query, nstatus, _r in nodes[iid]:
            if ntype == "HTTP" and nstatus == "completed":
                st.steps["http steps completed"] += 1
                url = json.loads(query)["url"].replace("{sys_instance_id}", iid)
                path = "/" + url.split("/", 3)[3]
                if count_path.get(path, 0) == 0:
                    out.append(
                        Violation(
                            "http_lost", iid, f"HTTP node {nid} completed, no request to {path}"
                        )
                    )
            elif ntype == "HTTP" and nstatus == "failed":
                st.steps["http steps failed (endpoint cut)"] += 1

    # signals (D6): every certainly sent signal is consumed by exactly one wait, or is still in
    # the inbox. The engine empties the inbox of an instance when it ends, so an unconsumed
    # signal of a terminal instance is lost only if a wait of that name is left unfulfilled;
    # otherwise it was discarded with the instance (no wait would ever take it: counted).
    consumed: Counter[tuple[str, str]] = Counter()
    open_waits: set[tuple[str, str]] = set()
    for iid in ids:
        for _nid, ntype, query, nstatus, result in nodes[iid]:
            if ntype != "SIGNAL":
                continue
            if nstatus == "completed" and isinstance(result, dict):
                data = result.get("data")
                if isinstance(data, dict) and "tok" in data:
                    consumed[(iid, data["tok"])] += 1
            elif nstatus != "completed":
                open_waits.add((iid, json.loads(query)["signal_name"]))
    st.steps["signals sent"] += sum(1 for s in sent if s.certain)
    st.steps["signals consumed"] += sum(consumed.values())
    st.steps["signals left in inbox"] += sum(inbox.values())
    discarded = 0
    for s in sent:
        k = (s.instance_id, s.token)
        n = consumed[k] + inbox[k]
        if n > 1:
            out.append(
                Violation(
                    "signal_duplicated",
                    s.instance_id,
                    f"signal {s.name} ({s.token}) consumed {consumed[k]}x, in inbox {inbox[k]}x",
                )
            )
        elif n == 0 and s.certain:
            terminal = status_of.get(s.instance_id) in TERMINAL
            if terminal and (s.instance_id, s.name) not in open_waits:
                discarded += 1
            else:
                out.append(
                    Violation(
                        "signal_lost",
                        s.instance_id,
                        f"signal {s.name} ({s.token}) neither consumed nor in the "
                        f"inbox (instance {status_of.get(s.instance_id)})",
                    )
                )
    st.steps["signals discarded at end (no wait)"] += discarded
    return out


def check_features(
    conn: psycopg.Connection[Any],
    ids: list[str],
    kind_of: dict[str, str],
    status_of: dict[str, str],
    nodes: dict[str, list[tuple[str, str, str, str, Any]]],
    st: Stats,
    keyed: dict[str, list[str | None]],
    label_of: dict[str, str],
) -> list[Violation]:
    """df.retry's attempts, idempotent starts, df.restart's runs and df.foreach's rows (their
    ledger rows are checked with every other kind's)."""
    out: list[Violation] = []
    for iid in ids:
        kind, status = kind_of[iid], status_of[iid]
        if kind in ("retry", "retry_fail") and status in TERMINAL:
            want = RETRY_MAX_ATTEMPTS if kind == "retry" else RETRY_FAIL_ATTEMPTS
            for nid, ntype, _q, nstatus, _r in nodes[iid]:
                if ntype != "RETRY":
                    continue
                row = conn.execute(
                    "select status_details from df.nodes where instance_id = %s and id = %s",
                    (iid, nid),
                ).fetchone()
                details = (row[0] if row else None) or {}
                attempt = int(details.get("attempt") or 0)
                st.features["retry attempts (all RETRY nodes)"] += attempt
                if attempt > 1:
                    st.features["retried steps (attempt > 1)"] += 1
                if attempt > want or int(details.get("max_attempts") or want) != want:
                    out.append(
                        Violation(
                            "retry_attempts", iid, f"RETRY {nid}: attempt {attempt} of {want}"
                        )
                    )
                if kind == "retry" and status == "completed" and nstatus != "completed":
                    out.append(
                        Violation(
                            "retry_attempts",
                            iid,
                            f"retry instance completed, RETRY {nid} {nstatus} after attempt "
                            f"{attempt} of {want}",
                        )
                    )  # (a retry instance not completed is an unexpected_status)
                elif kind == "retry_fail":
                    err = conn.execute("select df.error(%s)::text", (iid,)).fetchone()
                    text = (err[0] if err else None) or ""
                    named = f"gave up after {want} attempts" in text
                    if status != "failed" or nstatus != "failed" or attempt != want or not named:
                        out.append(
                            Violation(
                                "retry_attempts",
                                iid,
                                f"retry_fail instance {status}, RETRY {nid} {nstatus}, attempt "
                                f"{attempt} of {want}, df.error {text[:200]}",
                            )
                        )
                    else:
                        st.features["retries exhausted (instance failed, df.error named)"] += 1
        if kind == "foreach" and status == "completed" and " foreach " not in label_of[iid]:
            out += _check_foreach(conn, iid, nodes[iid], st)
        if kind == "restart":
            runs = conn.execute(
                "select count(*), count(*) filter (where status = 'failed') "
                "from df.instance_runs(%s)",
                (iid,),
            ).fetchone()
            n_runs, n_failed = (int(runs[0]), int(runs[1])) if runs else (0, 0)
            if n_runs >= 2:
                st.features["restarted instances (>= 2 runs)"] += 1
                if status == "completed":
                    st.features["restarted instances completed"] += 1
            if status in TERMINAL and n_runs < 2:
                out.append(
                    Violation(
                        "restart_runs",
                        iid,
                        f"restart instance {status} with {n_runs} run(s) ({n_failed} failed)",
                    )
                )
    # idempotent starts: one instance per key; every call that answered gave its id
    if keyed:
        per_key: dict[str, list[str]] = defaultdict(list)
        for iid, key in conn.execute(
            "select id, idempotency_key from df.instances where idempotency_key = any(%s)",
            (list(keyed),),
        ):
            per_key[key].append(iid)
        for key, answers in keyed.items():
            have = per_key.get(key, [])
            got = {a for a in answers if a is not None}
            st.features["keyed starts"] += 1
            if len(have) > 1:
                out.append(Violation("keyed_start", have[0], f"key {key}: instances {have}"))
            elif len(got) > 1 or (got and set(have) != got):
                out.append(
                    Violation(
                        "keyed_start",
                        have[0] if have else None,
                        f"key {key}: calls returned {answers}, instances {have}",
                    )
                )
            elif len(got) == 1 and all(a is not None for a in answers):
                st.features["keyed starts deduplicated (both calls, one id)"] += 1
    return out


def _check_foreach(
    conn: psycopg.Connection[Any], iid: str, ns: list[tuple[str, str, str, str, Any]], st: Stats
) -> list[Violation]:
    """A completed foreach instance: its FOREACH completed with FOREACH_ROWS results in row
    order, and exactly one completed child per row number 1..FOREACH_ROWS."""
    out: list[Violation] = []
    fe = [n for n in ns if n[1] == "FOREACH"]
    if len(fe) != 1 or fe[0][3] != "completed":
        return [Violation("foreach_rows", iid, f"FOREACH nodes {[(n[0], n[3]) for n in fe]}")]
    res = fe[0][4] if isinstance(fe[0][4], dict) else {}
    order = [
        (r.get("rows") or [{}])[0].get("g") if isinstance(r, dict) else None
        for r in res.get("rows") or []
    ]
    if res.get("row_count") != FOREACH_ROWS or order != list(range(1, FOREACH_ROWS + 1)):
        out.append(Violation("foreach_rows", iid, f"FOREACH result {json.dumps(res)[:300]}"))
    kids = conn.execute(
        "select split_part(i.label, ' row ', 2), i.status from df.instances i "
        "join df.instances p on i.label like p.label || ' foreach %% row %%' where p.id = %s",
        (iid,),
    ).fetchall()
    rows = Counter(str(r[0]) for r in kids)
    if sorted(rows) != [str(k) for k in range(1, FOREACH_ROWS + 1)] or max(rows.values()) != 1:
        out.append(Violation("foreach_rows", iid, f"children per row number: {dict(rows)}"))
    elif any(r[1] != "completed" for r in kids):
        out.append(Violation("foreach_rows", iid, f"children {sorted(kids)}"))
    else:
        st.features["foreach instances completed (rows once each, in order)"] += 1
    return out
