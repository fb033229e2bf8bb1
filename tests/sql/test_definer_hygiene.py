"""Name-resolution hygiene of every installed function, read from the catalog (all schema parts).

Why: PostgreSQL searches the session's temporary schema FIRST for relations and types unless
``pg_temp`` is listed in search_path, so ``set search_path = pg_catalog`` alone let a caller's
temp table ``pg_namespace`` or temp DOMAIN ``regrole``/``jsonb``/``text`` stand in for the real
one inside a SECURITY DEFINER function, i.e. run the caller's code with the definer's rights
(tests/sql/test_temp_shadowing.py has the attacks). The rules checked here:

1. every function in df, the engine schema and the runner schema pins exactly
   ``search_path = pg_catalog, pg_temp`` (pg_temp last: pg_catalog wins every name it has);
   the per-role step runners in ``<engine>_exec`` are the exception: they must NOT pin it
   (a step runs with the submitting role's own settings);
2. every function that runs with more than its caller's rights names everything
   schema-qualified, so nothing depends on search_path at all: the SECURITY DEFINER functions,
   every function of the engine schema (the service calls those in sessions that also run
   tenants' step SQL, so a step's temp objects live in the same session), and whatever df or
   engine function those call (they run with the same rights). Checked in the body text: no
   unqualified relation after FROM/JOIN/UPDATE/INSERT INTO/TABLE (CTE names excepted), no
   ``::type`` cast, typed literal, declared plpgsql variable or column definition list type
   that does not name its schema (pg_catalog, df or the engine's).

Operators and functions are never looked up in pg_temp, so unqualified ones are safe once
pg_temp is last (30_control.sql header); they are not linted.

The lint works on the body with comments removed and string literals (also dollar-quoted
ones: dynamic SQL is text, not code) blanked, so words inside them cannot trip it. It is a
lint, not a parser: ``DELETE … USING x`` and relations inside dynamic SQL are not seen.

Results are grouped per schema file (one test per file and server), so a file whose functions
are all clean passes on its own; the assertion message lists every offender.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from pgdurable.schema import ENGINE_SCHEMA_DEFAULT
from pgdurable.sql import schema_parts

Conn = psycopg.Connection[Any]

ENGINE = ENGINE_SCHEMA_DEFAULT
EXEC = f"{ENGINE}_exec"
SCHEMAS = ("df", ENGINE, EXEC)
PINNED = "pg_catalog, pg_temp"
QUALIFIERS = ("pg_catalog", "df", ENGINE, EXEC)
UNMAPPED = "(no schema file)"


# -- which schema file defines a function ---------------------------------------------------------

_CREATE_RE = re.compile(
    r"create\s+(?:or\s+replace\s+)?function\s+"
    r"(\"?[A-Za-z_@][\w@$]*\"?)\s*\.\s*(\"?[A-Za-z_][\w$]*\"?)\s*\(",
    re.IGNORECASE,
)


def _unquote(name: str) -> str:
    return name[1:-1] if name.startswith('"') else name.lower()


def _defined_in() -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    for part in schema_parts():
        text = part.read_text().replace("@engine@", ENGINE)
        for m in _CREATE_RE.finditer(text):
            out.setdefault((_unquote(m.group(1)), _unquote(m.group(2))), part.name)
    return out


DEFINED_IN = _defined_in()
PARTS = [p.name for p in schema_parts()] + [UNMAPPED]


# -- the catalog --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fn:
    schema: str
    name: str
    args: str
    secdef: bool
    config: tuple[str, ...]
    lang: str
    src: str

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}({self.args})"

    @property
    def part(self) -> str:
        return DEFINED_IN.get((self.schema, self.name), UNMAPPED)

    @property
    def runner(self) -> bool:
        return self.schema == EXEC


def functions(conn: Conn) -> list[Fn]:
    rows = conn.execute(
        "select n.nspname, p.proname, pg_catalog.pg_get_function_identity_arguments(p.oid),"
        "       p.prosecdef, coalesce(p.proconfig, '{}'), l.lanname, coalesce(p.prosrc, '')"
        " from pg_catalog.pg_proc p"
        " join pg_catalog.pg_namespace n on n.oid = p.pronamespace"
        " join pg_catalog.pg_language l on l.oid = p.prolang"
        " where n.nspname = any(%s) and p.prokind in ('f', 'p')"
        " order by 1, 2, 3",
        (list(SCHEMAS),),
    ).fetchall()
    return [Fn(r[0], r[1], r[2], r[3], tuple(r[4]), r[5], r[6]) for r in rows]


# -- the lint -----------------------------------------------------------------------------------

_DOLLAR_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def strip_sql(src: str) -> str:
    """src with comments removed and literals blanked to '' (newlines kept, so lines match)."""
    out: list[str] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("--", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
            continue
        if src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(" " + "\n" * src.count("\n", i, j))
            i = j
            continue
        if c == "'":
            # E'…' strings take backslash escapes
            esc = (
                i > 0
                and src[i - 1] in "eE"
                and not (i > 1 and (src[i - 2].isalnum() or src[i - 2] == "_"))
            )
            j = i + 1
            while j < n:
                if esc and src[j] == "\\":
                    j += 2
                    continue
                if src[j] == "'":
                    if j + 1 < n and src[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            j = min(j + 1, n)
            out.append("''" + "\n" * src.count("\n", i, j))
            i = j
            continue
        if c == "$" and not (i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_$")):
            m = _DOLLAR_RE.match(src, i)
            if m:
                j = src.find(m.group(0), m.end())
                j = n if j < 0 else j + len(m.group(0))
                out.append("''" + "\n" * src.count("\n", i, j))
                i = j
                continue
        if c == '"':
            j = i + 1
            while j < n:
                if src[j] == '"':
                    if j + 1 < n and src[j + 1] == '"':
                        j += 2
                        continue
                    break
                j += 1
            out.append(src[i : j + 1])
            i = j + 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


_IDENT = r'(?:"[^"]*"|[a-z_][a-z0-9_$]*)'
_QNAME = rf"{_IDENT}(?:\s*\.\s*{_IDENT})*"
_TOKEN_RE = re.compile(rf"{_QNAME}|''|::|:=|\S")
_CTE_RE = re.compile(
    rf"(?:\bwith\s+(?:recursive\s+)?|,\s*)({_IDENT})\s*(?:\([^()]*\))?\s+as\s+"
    r"(?:not\s+)?(?:materialized\s+)?\("
)
_CAST_RE = re.compile(rf"::\s*({_QNAME})")
_TYPE_WORDS = (
    "text|varchar|char|name|json|jsonb|timestamptz|timestamp|date|time|interval|"
    "regrole|regclass|regproc|regprocedure|regtype|oid|uuid|inet|bytea|numeric|int|"
    "integer|int2|int4|int8|bigint|smallint|bool|boolean|float4|float8|real"
)
_TYPED_LITERAL_RE = re.compile(rf"(?<![.\w$\"])({_TYPE_WORDS})\s+''")
_COLDEF_RE = re.compile(rf"\)\s+as\s+{_IDENT}\s*\(([^()]*)\)")
_DECLARE_RE = re.compile(r"\bdeclare\b(.*?)\bbegin\b", re.DOTALL)
_CALL_RE = re.compile(rf"\b(df|{re.escape(ENGINE)})\s*\.\s*({_IDENT})\s*\(")
# words that may precede FROM without FROM starting a relation list
_NOT_A_FROM = {
    "distinct",
    "both",
    "leading",
    "trailing",
    "epoch",
    "year",
    "month",
    "day",
    "hour",
    "minute",
    "second",
    "milliseconds",
    "microseconds",
    "dow",
    "doy",
    "week",
    "quarter",
    "decade",
    "century",
    "millennium",
    "isodow",
    "isoyear",
    "timezone",
}
_NOT_A_RELATION = {
    "lateral",
    "only",
    "select",
    "values",
    "with",
    "set",
    "of",
    "skip",
    "nowait",
    "rows",
    "''",
}


def _qualified(name: str) -> bool:
    parts = re.findall(_IDENT, name)
    return len(parts) > 1 and _unquote(parts[0]) in QUALIFIERS


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def lint(src: str, lang: str) -> list[str]:
    """What the body names without a schema: ['<what> <name> (body line N)', ...]."""
    text = strip_sql(src).lower()
    bad: list[str] = []
    ctes = {_unquote(m.group(1)) for m in _CTE_RE.finditer(text)}

    for m in _CAST_RE.finditer(text):
        if not _qualified(m.group(1)):
            bad.append(f"cast ::{m.group(1)} (body line {_line(text, m.start())})")
    for m in _TYPED_LITERAL_RE.finditer(text):
        bad.append(f"typed literal {m.group(1)} '…' (body line {_line(text, m.start())})")
    for m in _COLDEF_RE.finditer(text):
        for col in m.group(1).split(","):
            words = col.split(None, 1)
            if len(words) == 2 and not _qualified(words[1].strip()):
                bad.append(
                    f"column definition type {words[1].strip()} "
                    f"(body line {_line(text, m.start())})"
                )

    toks = [(t.group(0), t.start()) for t in _TOKEN_RE.finditer(text)]
    for k, (tok, pos) in enumerate(toks):
        if tok not in ("from", "join", "update", "into", "table"):
            continue
        prev = toks[k - 1][0] if k > 0 else ""
        nxt = toks[k + 1][0] if k + 1 < len(toks) else ""
        after = toks[k + 2][0] if k + 2 < len(toks) else ""
        if tok == "from" and prev in _NOT_A_FROM:
            continue
        if tok == "update" and prev in ("for", "do", "key"):
            continue
        if tok == "into" and prev not in ("insert", "merge"):
            continue  # plpgsql SELECT … INTO variable
        if tok == "table" and nxt == "(":
            continue  # RETURNS TABLE (…)
        if nxt in _NOT_A_RELATION or not re.fullmatch(_QNAME, nxt) or after == "(":
            continue  # a subquery, a function call, a keyword
        if "." in nxt and _qualified(nxt):
            continue
        if "." not in nxt and _unquote(nxt) in ctes:
            continue
        bad.append(f"relation {nxt} after {tok.upper()} (body line {_line(text, pos)})")

    if lang == "plpgsql":
        for block in _DECLARE_RE.finditer(text):
            for piece in re.finditer(r"[^;]+", block.group(1)):
                decl = piece.group(0)
                m = re.match(rf"\s*({_IDENT})\s+(?:constant\s+)?(.*)$", decl, re.DOTALL)
                if not m:
                    continue
                rest = m.group(2).strip()
                if re.match(r"(?:(?:no\s+)?scroll\s+)?cursor\b|alias\s+for\b", rest):
                    continue
                typ = re.split(r"\s*(?::=|=|\bdefault\b|\bnot\s+null\b|\bcollate\b)", rest)[0]
                typ = typ.strip()
                if typ == "record" or typ.endswith(("%type", "%rowtype")) or _qualified(typ):
                    continue
                at = block.start(1) + piece.start() + m.start(2)
                bad.append(f"declared type {m.group(1)} {typ} (body line {_line(text, at)})")
    return bad


def callees(src: str) -> set[tuple[str, str]]:
    """The df/engine functions a body calls by qualified name."""
    return {(m.group(1), _unquote(m.group(2))) for m in _CALL_RE.finditer(strip_sql(src).lower())}


def privileged(fns: list[Fn]) -> list[Fn]:
    """Definers, the engine schema's functions, and everything they call (transitively)."""
    by_name: dict[tuple[str, str], list[Fn]] = {}
    for f in fns:
        by_name.setdefault((f.schema, f.name), []).append(f)
    todo = [f for f in fns if not f.runner and (f.secdef or f.schema == ENGINE)]
    seen: dict[str, Fn] = {}
    while todo:
        f = todo.pop()
        if f.label in seen:
            continue
        seen[f.label] = f
        for key in callees(f.src):
            todo.extend(g for g in by_name.get(key, []) if not g.runner)
    return sorted(seen.values(), key=lambda f: f.label)


def report(title: str, offenders: dict[str, list[str]]) -> str:
    lines = [
        f"{title}: {sum(len(v) for v in offenders.values())} offender(s) "
        f"in {len(offenders)} function(s)"
    ]
    for label, what in sorted(offenders.items()):
        lines.append(f"  {label}")
        lines.extend(f"      {w}" for w in what)
    return "\n".join(lines)


# -- the lint checks itself (no database) ----------------------------------------------------------


def test_lint_sees_through_literals_and_comments():
    src = """
    declare
        v_a pg_catalog.text := 'from pg_roles r';  -- from pg_namespace
        v_b record;
        v_c text;
        v_d df.instances.id%type;
    begin
        /* select x::text from evil */
        raise exception 'update evil set x = 1; insert into evil' using errcode = '22023';
        v_a := E'it''s \\' from evil' || $q$ select 1 from evil::text $q$;
        select i.id into v_a from df.instances i where i.status is distinct from v_a;
        with recursive walk(id) as (select 1), more as (select 2)
        select extract(epoch from w.at)::pg_catalog.int8 from walk w join more m on true
        cross join lateral pg_catalog.jsonb_array_elements(v_j) e
        join pg_catalog.jsonb_to_recordset(v_j) as r(a pg_catalog.text, b int) on true
        left join unnest(v_x) u on true;
        perform 1 from pg_roles for update;
        insert into pgdurable.tasks (a) values (1) on conflict do update set a = 2;
        update instances set a = 1;
        v_a := timestamptz 'epoch'::pg_catalog.text || pg_catalog.timestamptz 'epoch';
        v_a := v_b::regrole::pg_catalog.text;
    end"""
    got = lint(src, "plpgsql")
    assert got == [
        "cast ::regrole (body line 21)",
        "typed literal timestamptz '…' (body line 20)",
        "column definition type int (body line 15)",
        "relation pg_roles after FROM (body line 17)",
        "relation instances after UPDATE (body line 19)",
        "declared type v_c text (body line 5)",
    ], got
    assert callees("select df._try_jsonb(x), pgdurable._may_act(y), 'df.no(1)'") == {
        ("df", "_try_jsonb"),
        (ENGINE, "_may_act"),
    }


# -- the checks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("part", PARTS)
def test_search_path_is_pinned_with_pg_temp_last(tx, part):
    offenders: dict[str, list[str]] = {}
    for f in functions(tx):
        if f.part != part or f.runner:
            continue
        paths = [c.split("=", 1)[1] for c in f.config if c.startswith("search_path=")]
        if paths != [PINNED]:
            offenders[f.label] = [f"search_path {paths or 'not set'}, want [{PINNED!r}]"]
    assert not offenders, report(f"{part}: functions without search_path = {PINNED}", offenders)


@pytest.mark.parametrize("part", PARTS)
def test_privileged_bodies_name_everything_qualified(tx, part):
    offenders: dict[str, list[str]] = {}
    for f in privileged(functions(tx)):
        if f.part != part:
            continue
        bad = lint(f.src, f.lang)
        if bad:
            kind = (
                "SECURITY DEFINER"
                if f.secdef
                else ("engine" if f.schema == ENGINE else "called by a privileged function")
            )
            offenders[f"{f.label}  [{kind}]"] = bad
    assert not offenders, report(f"{part}: unqualified names in privileged functions", offenders)


def test_privileged_set_covers_the_definers(tx):
    """The lint really looks at the helpers the df functions reach, and at what they call."""
    labels = {f.label.split("(")[0] for f in privileged(functions(tx))}
    for name in [
        "_schema_ready_v1",
        "_enqueue_v1",
        "_signal_v1",
        "_cancel_v1",
        "_invoker",
        "_may_act",
    ]:
        assert f"{ENGINE}.{name}" in labels
    assert {"df.metrics", "df._try_jsonb"} <= labels
    assert not any(label.startswith(f"{EXEC}.") for label in labels)


def test_step_runners_do_not_pin_search_path(db):
    role = db.create_role("hyr")
    query = (
        "select p.proname, coalesce(p.proconfig, '{}') from pg_catalog.pg_proc p "
        "where p.pronamespace = %s::pg_catalog.regnamespace"
    )
    with db.connect() as admin:
        runners = admin.execute(query, (EXEC,)).fetchall()
        if (
            not runners
            and admin.execute(
                "select pg_catalog.to_regprocedure(%s) is not null",
                (f"{ENGINE}._runner_v1(regrole)",),
            ).fetchone()[0]
        ):
            admin.execute(f"select {ENGINE}._runner_v1(%s::pg_catalog.regrole)", (role,))
            runners = admin.execute(query, (EXEC,)).fetchall()
    if not runners:
        pytest.skip("no step runner could be made here")
    pinned = [
        (name, cfg) for name, cfg in runners if any(c.startswith("search_path=") for c in cfg)
    ]
    assert not pinned, f"step runners must run with the step's own search_path: {pinned}"


def test_functions_that_disable_plan_paths_turn_jit_off(db):
    # a path disabled by enable_* = off still costs 10^10 on PostgreSQL 14-17 when it is the
    # only one, past jit_above_cost: JIT would then compile the statement at every call
    # (0.1-0.5 s for a statement that runs in a millisecond)
    with db.connect() as admin:
        rows = admin.execute(
            "select p.oid::pg_catalog.regprocedure::text, coalesce(p.proconfig, '{}') "
            "from pg_catalog.pg_proc p where p.pronamespace in "
            "(%s::pg_catalog.regnamespace, 'df'::pg_catalog.regnamespace)",
            (ENGINE,),
        ).fetchall()
    disabling = {
        name: cfg
        for name, cfg in rows
        if any(c.endswith("=off") and c.startswith("enable_") for c in cfg)
    }
    assert disabling, "no function disables a plan path: this test checks nothing"
    assert [n for n, cfg in disabling.items() if "jit=off" not in cfg] == []
