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

Also the run's records it reads and fills: :class:`SentSignal`, :class:`Violation`,
:class:`Stats`.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg

from .workload import LABEL_PREFIX, LEDGER, LEDGER_RE, LOOP_TOTALS

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


def check(
    conn: psycopg.Connection[Any],
    sent: list[SentSignal],
    http_requests: list[tuple[str, str | None]],
    *,
    http_cut: bool,
    label_prefix: str = LABEL_PREFIX,
    stats: Stats | None = None,
) -> list[Violation]:
    """Every violation of the guarantees (docs/reliability.md) visible in the database
    (``conn``: a superuser session of the df database) for the instances labelled
    ``label_prefix<kind>:<n>``."""
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
