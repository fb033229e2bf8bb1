"""Behaviour of the scheduler twins: every rule of the ``_abc`` docstring, per implementation."""

from __future__ import annotations

import random

import pytest

from pgdurable.graph._abc import (
    COMPLETED,
    COND_IF_ROWS,
    FAILED,
    HOW_ARRAY,
    HOW_BREAK,
    HOW_BREAK_OUTSIDE,
    HOW_COPY,
    HOW_FAIL,
    HOW_ITERCAP,
    HOW_LEAF,
    LEAF_TYPES,
    PENDING,
    RETRY,
    RUNNING,
    T_CANCELLED,
    T_COMPLETED,
    T_FAILED,
    T_RUNNING,
    Step,
)
from pgdurable.graph.compile import CompiledGraph, compile_value
from tests.graphs import brk, if_, if_rows, join, loop, race, sleep, sql, then
from tests.native.parity import random_graph


class Run:
    """A scheduler over a graph whose nodes are addressed by result_name."""

    def __init__(self, impl, value, max_iterations: int = 100) -> None:
        self.g: CompiledGraph = compile_value(value)
        self.s = impl(self.g, max_iterations)

    def __getitem__(self, name: str) -> int:
        return self.g.result_names.index(name)

    def start(self) -> Step:
        return self.s.start()

    def done(self, name: str, ok: bool = True, truthy: bool = True) -> Step:
        n = self[name]
        return self.s.complete(n, self.s.gen(n), ok, truthy)

    def names(self, pairs) -> list[str | None]:
        return [self.g.result_names[p[0]] for p in pairs]

    def fin(self, step: Step) -> list[tuple[str | None, int, int, list[str | None]]]:
        rn = self.g.result_names
        return [(rn[n], st, how, [rn[s] for s in src]) for n, st, how, src in step.finished]


EMPTY_LISTS = ([], [], [], [], [])


def is_empty(step: Step) -> bool:
    return tuple(step[:5]) == EMPTY_LISTS and step.stopped == []


# -- leaves and THEN -------------------------------------------------------------------


def test_single_leaf(impl):
    r = Run(impl, sql("a"))
    st = r.start()
    assert st.ready == [(0, 1)]
    assert st.started == [(0, 1)]
    assert st.terminal == T_RUNNING
    assert r.s.status(0) == RUNNING
    st = r.done("a")
    assert st.finished == [(0, COMPLETED, HOW_LEAF, [])]
    assert st.terminal == T_COMPLETED == r.s.terminal
    assert r.s.status(0) == COMPLETED


def test_single_leaf_fails(impl):
    r = Run(impl, sql("a"))
    r.start()
    st = r.done("a", ok=False)
    assert st.finished == [(0, FAILED, HOW_LEAF, [])]
    assert st.terminal == T_FAILED


def test_then_runs_left_then_right(impl):
    r = Run(impl, then(sql("a"), sql("b"), name="t"))
    st = r.start()
    assert r.names(st.ready) == ["a"]
    assert r.names(st.started) == ["t", "a"]
    st = r.done("a")
    assert r.names(st.ready) == ["b"]
    assert r.fin(st) == [("a", COMPLETED, HOW_LEAF, [])]
    assert r.s.status(r["b"]) == RUNNING
    st = r.done("b")
    assert r.fin(st) == [("b", COMPLETED, HOW_LEAF, []), ("t", COMPLETED, HOW_COPY, ["b"])]
    assert st.terminal == T_COMPLETED


def test_then_left_failure_skips_right(impl):
    r = Run(impl, then(sql("a"), sql("b"), name="t"))
    r.start()
    st = r.done("a", ok=False)
    assert r.fin(st) == [("a", FAILED, HOW_LEAF, []), ("t", FAILED, HOW_FAIL, ["a"])]
    assert st.ready == []
    assert st.terminal == T_FAILED
    assert r.s.status(r["b"]) == PENDING
    assert r.s.gen(r["b"]) == 0


def test_deep_then_chain_is_iterative(impl):
    g = sql("x0")
    for i in range(1, 3000):
        g = then(g, sql(f"x{i}"))
    r = Run(impl, g)
    st = r.start()
    assert r.names(st.ready) == ["x0"]
    for i in range(3000):
        st = r.done(f"x{i}")
    assert st.terminal == T_COMPLETED
    assert len(st.finished) == 2  # left-deep: x2999 and the root
    # right-deep: the last leaf finishes every THEN above it in one call
    g = sql("y2999")
    for i in range(2998, -1, -1):
        g = then(sql(f"y{i}"), g)
    r = Run(impl, g)
    r.start()
    for i in range(3000):
        st = r.done(f"y{i}")
    assert st.terminal == T_COMPLETED
    assert len(st.finished) == 3000


# -- IF --------------------------------------------------------------------------------


@pytest.mark.parametrize(("truthy", "arm", "branch"), [(True, "a", 1), (False, "b", 2)])
def test_if_condition_picks_arm(impl, truthy, arm, branch):
    r = Run(impl, if_(sql("c"), sql("a"), sql("b"), name="i"))
    st = r.start()
    assert r.names(st.started) == ["i", "c"]
    assert r.names(st.ready) == ["c"]
    st = r.done("c", truthy=truthy)
    assert r.names(st.ready) == [arm]
    st = r.done(arm, truthy=False)
    assert r.fin(st) == [(arm, COMPLETED, HOW_LEAF, []), ("i", COMPLETED, HOW_COPY, [arm])]
    assert st.terminal == T_COMPLETED
    other = "b" if arm == "a" else "a"
    assert r.s.status(r[other]) == PENDING
    assert r.s.dump_state()[4 + 2 * len(r.g) + r["i"]] == branch  # aux: arm taken


def test_if_failed_condition_fails_if(impl):
    r = Run(impl, if_(sql("c"), sql("a"), sql("b"), name="i"))
    r.start()
    st = r.done("c", ok=False)
    assert r.fin(st) == [("c", FAILED, HOW_LEAF, []), ("i", FAILED, HOW_FAIL, ["c"])]
    assert st.ready == []
    assert st.terminal == T_FAILED


def test_if_truthy_of_composite_condition(impl):
    # condition = THEN: its truthy is its right child's (COPY)
    r = Run(impl, if_(then(sql("c1"), sql("c2")), sql("a"), sql("b")))
    r.start()
    r.done("c1", truthy=True)
    st = r.done("c2", truthy=False)
    assert r.names(st.ready) == ["b"]


def test_if_join_condition_is_truthy(impl):
    r = Run(impl, if_(join(sql("c1"), sql("c2")), sql("a"), sql("b")))
    r.start()
    r.done("c1", truthy=False)
    st = r.done("c2", truthy=False)
    assert r.names(st.ready) == ["a"]  # an array result is truthy


@pytest.mark.parametrize(("truthy", "arm"), [(True, "a"), (False, "b")])
def test_if_rows_decision(impl, truthy, arm):
    r = Run(impl, if_rows(sql("a"), sql("b"), name="i"))
    st = r.start()
    assert r.names(st.ready) == ["i"]  # the executor decides it
    st = r.done("i", truthy=truthy)
    assert st.finished == []
    assert r.names(st.ready) == [arm]
    # a duplicate decision is fenced off
    assert is_empty(r.s.complete(r["i"], r.s.gen(r["i"]), True, not truthy))
    st = r.done(arm)
    assert r.fin(st)[-1] == ("i", COMPLETED, HOW_COPY, [arm])


def test_if_rows_decision_fails(impl):
    r = Run(impl, then(if_rows(sql("a"), sql("b"), name="i"), sql("z"), name="t"))
    r.start()
    st = r.done("i", ok=False)
    assert r.fin(st) == [("i", FAILED, HOW_LEAF, []), ("t", FAILED, HOW_FAIL, ["i"])]
    assert st.terminal == T_FAILED


# -- JOIN ------------------------------------------------------------------------------


def test_join2_waits_for_all(impl):
    r = Run(impl, join(sql("a"), sql("b"), name="j"))
    st = r.start()
    assert r.names(st.ready) == ["a", "b"]
    assert r.names(st.started) == ["j", "a", "b"]
    st = r.done("b")
    assert r.fin(st) == [("b", COMPLETED, HOW_LEAF, [])]
    assert st.terminal == T_RUNNING
    st = r.done("a")
    assert r.fin(st) == [("a", COMPLETED, HOW_LEAF, []), ("j", COMPLETED, HOW_ARRAY, ["a", "b"])]
    assert st.terminal == T_COMPLETED


def test_join3(impl):
    r = Run(impl, join(sql("a"), sql("b"), sql("c"), name="j"))
    st = r.start()
    assert r.names(st.ready) == ["a", "b", "c"]
    r.done("c")
    r.done("a")
    st = r.done("b")
    assert r.fin(st)[-1] == ("j", COMPLETED, HOW_ARRAY, ["a", "b", "c"])


def test_join_failing_branch_abandons_others(impl):
    r = Run(impl, join(then(sql("a1"), sql("a2"), name="ta"), sql("b"), sql("c"), name="j"))
    r.start()
    st = r.done("b", ok=False)
    assert r.names(st.abandoned) == ["a1", "c"]
    assert [g for _, g in st.abandoned] == [1, 1]
    assert r.fin(st) == [("b", FAILED, HOW_LEAF, []), ("j", FAILED, HOW_FAIL, ["b"])]
    assert st.terminal == T_FAILED
    assert r.s.status(r["a1"]) == FAILED
    assert r.s.status(r["ta"]) == FAILED
    assert r.s.status(r["a2"]) == PENDING
    # late completion of an abandoned leaf is ignored
    assert is_empty(r.done("a1"))


def test_nested_join_failure_abandons_outer_siblings(impl):
    r = Run(impl, join(sql("x"), join(sql("a"), sql("b")), name="j"))
    r.start()
    st = r.done("a", ok=False)
    assert r.names(st.abandoned) == ["x", "b"]  # ascending index


# -- RACE ------------------------------------------------------------------------------


def test_race_won_by_success(impl):
    r = Run(impl, race(then(sql("a1"), sql("a2")), sleep("t"), name="r"))
    st = r.start()
    assert r.names(st.ready) == ["a1", "t"]
    st = r.done("t", truthy=True)
    assert r.names(st.abandoned) == ["a1"]
    assert r.fin(st) == [("t", COMPLETED, HOW_LEAF, []), ("r", COMPLETED, HOW_COPY, ["t"])]
    assert st.terminal == T_COMPLETED
    assert is_empty(r.done("a1"))


def test_race_won_by_failure(impl):
    r = Run(impl, race(sql("a"), sql("b"), name="r"))
    r.start()
    st = r.done("a", ok=False)
    assert r.names(st.abandoned) == ["b"]
    assert r.fin(st) == [("a", FAILED, HOW_LEAF, []), ("r", FAILED, HOW_FAIL, ["a"])]
    assert st.terminal == T_FAILED


def test_race_loser_if_rows_is_abandoned(impl):
    r = Run(impl, race(sql("a"), if_rows(sql("x"), sql("y"), name="i")))
    st = r.start()
    assert r.names(st.ready) == ["a", "i"]
    st = r.done("a")
    assert r.names(st.abandoned) == ["i"]


def test_race_inside_then_continues(impl):
    r = Run(impl, then(race(sql("a"), sql("b"), name="r"), sql("c"), name="t"))
    r.start()
    st = r.done("b")
    assert r.names(st.abandoned) == ["a"]
    assert r.names(st.ready) == ["c"]
    assert st.terminal == T_RUNNING


# -- LOOP ------------------------------------------------------------------------------


def test_do_while_loop(impl):
    r = Run(impl, loop(sql("b"), sql("c"), name="l"))
    st = r.start()
    assert r.names(st.started) == ["l", "b"]
    assert r.s.iteration(r["l"]) == 1
    st = r.done("b", truthy=False)
    assert r.names(st.ready) == ["c"]
    st = r.done("c", truthy=True)
    assert st.iterations == [(r["l"], 2)]
    assert st.ready == [(r["b"], 2)]
    assert r.s.iteration(r["l"]) == 2
    assert r.s.status(r["c"]) == PENDING
    assert r.s.gen(r["c"]) == 1
    r.done("b", truthy=True)
    st = r.done("c", truthy=False)
    assert r.fin(st) == [("c", COMPLETED, HOW_LEAF, []), ("l", COMPLETED, HOW_COPY, ["b"])]
    assert st.terminal == T_COMPLETED


def test_loop_result_truthy_is_last_body(impl):
    r = Run(impl, if_(loop(sql("b"), sql("c")), sql("x"), sql("y")))
    r.start()
    r.done("b", truthy=True)
    st = r.done("c", truthy=False)
    assert r.names(st.ready) == ["x"]


def test_infinite_loop_with_break(impl):
    body = then(sql("a"), if_(sql("c"), brk("k"), sql("z"), name="i"), name="t")
    r = Run(impl, then(loop(body, name="l"), sql("after"), name="root"))
    r.start()
    for k in range(2, 5):
        r.done("a")
        r.done("c", truthy=False)
        st = r.done("z")
        assert st.iterations == [(r["l"], k)]
        assert st.ready == [(r["a"], k)]
    r.done("a")
    st = r.done("c", truthy=True)
    assert r.names(st.ready) == ["k"]
    st = r.done("k", truthy=False)
    assert r.fin(st) == [
        ("k", COMPLETED, HOW_LEAF, []),
        ("i", COMPLETED, HOW_BREAK, ["k"]),
        ("t", COMPLETED, HOW_BREAK, ["k"]),
        ("l", COMPLETED, HOW_BREAK, ["k"]),
    ]
    assert r.names(st.ready) == ["after"]
    assert r.s.gen(r["k"]) == 1  # the BREAK ran once
    assert r.s.iteration(r["l"]) == 4


def test_iteration_cap(impl):
    r = Run(impl, then(loop(sql("b"), name="l"), sql("z"), name="t"), max_iterations=3)
    r.start()
    r.done("b")
    r.done("b")
    st = r.done("b")
    assert r.fin(st) == [
        ("b", COMPLETED, HOW_LEAF, []),
        ("l", FAILED, HOW_ITERCAP, []),
        ("t", FAILED, HOW_FAIL, ["l"]),
    ]
    assert st.iterations == []
    assert st.terminal == T_FAILED
    assert r.s.iteration(r["l"]) == 3


def test_failed_body_and_condition_fail_loop(impl):
    r = Run(impl, loop(sql("b"), sql("c"), name="l"))
    r.start()
    st = r.done("b", ok=False)
    assert r.fin(st)[-1] == ("l", FAILED, HOW_FAIL, ["b"])
    r = Run(impl, loop(sql("b"), sql("c"), name="l"))
    r.start()
    r.done("b")
    st = r.done("c", ok=False)
    assert r.fin(st)[-1] == ("l", FAILED, HOW_FAIL, ["c"])


def test_nested_loops(impl):
    inner = loop(sql("a"), sql("ic"), name="inner")
    r = Run(impl, loop(then(inner, sql("b")), sql("oc"), name="outer"))
    r.start()
    r.done("a")
    st = r.done("ic", truthy=True)
    assert st.iterations == [(r["inner"], 2)]
    r.done("a")
    r.done("ic", truthy=False)
    st = r.done("b")
    assert r.names(st.ready) == ["oc"]
    st = r.done("oc", truthy=True)
    assert st.iterations == [(r["outer"], 2)]
    assert r.s.iteration(r["inner"]) == 1  # restarted
    assert st.ready == [(r["a"], 3)]
    assert r.s.gen(r["inner"]) == 2


def test_break_exits_innermost_loop_only(impl):
    inner = loop(then(sql("a"), brk("k")), name="inner")
    r = Run(impl, loop(then(inner, sql("b")), sql("oc"), name="outer"))
    r.start()
    r.done("a")
    st = r.done("k")
    assert r.fin(st)[-1] == ("inner", COMPLETED, HOW_BREAK, ["k"])
    assert r.names(st.ready) == ["b"]
    r.done("b")
    st = r.done("oc", truthy=False)
    assert st.terminal == T_COMPLETED


def test_break_through_join_abandons_other_branches(impl):
    body = join(then(sql("a"), brk("k")), then(sql("x"), sql("y"), name="tx"), name="j")
    r = Run(impl, loop(body, name="l"))
    r.start()
    r.done("a")
    st = r.done("k")
    assert r.names(st.abandoned) == ["x"]
    assert r.fin(st) == [
        ("k", COMPLETED, HOW_LEAF, []),
        (None, COMPLETED, HOW_BREAK, ["k"]),  # the THEN around the BREAK
        ("j", COMPLETED, HOW_BREAK, ["k"]),
        ("l", COMPLETED, HOW_BREAK, ["k"]),
    ]
    assert st.terminal == T_COMPLETED
    assert r.s.status(r["tx"]) == FAILED
    assert is_empty(r.done("x"))


def test_break_through_race(impl):
    r = Run(impl, loop(race(brk("k"), sql("x"), name="r"), name="l"))
    r.start()
    st = r.done("k")
    assert r.names(st.abandoned) == ["x"]
    assert r.fin(st)[1:] == [("r", COMPLETED, HOW_BREAK, ["k"]), ("l", COMPLETED, HOW_BREAK, ["k"])]


def test_break_outside_loop(impl):
    r = Run(impl, join(then(sql("a"), brk("k"), name="t"), sql("x"), name="j"))
    r.start()
    r.done("a")
    st = r.done("k")
    assert r.fin(st) == [
        ("k", COMPLETED, HOW_LEAF, []),
        ("t", FAILED, HOW_BREAK_OUTSIDE, ["k"]),
        ("j", FAILED, HOW_BREAK_OUTSIDE, ["k"]),
    ]
    assert r.names(st.abandoned) == ["x"]
    assert st.terminal == T_FAILED


def test_root_break(impl):
    r = Run(impl, brk("k"))
    r.start()
    st = r.done("k")
    assert r.fin(st) == [("k", COMPLETED, HOW_LEAF, [])]
    assert st.terminal == T_FAILED


def test_failed_break_is_a_failure(impl):
    r = Run(impl, loop(brk("k"), name="l"))
    r.start()
    st = r.done("k", ok=False)
    assert r.fin(st) == [("k", FAILED, HOW_LEAF, []), ("l", FAILED, HOW_FAIL, ["k"])]


def test_break_in_loop_condition(impl):
    r = Run(impl, loop(sql("b"), brk("k"), name="l"))
    r.start()
    r.done("b")
    st = r.done("k")
    assert r.fin(st)[-1] == ("l", COMPLETED, HOW_BREAK, ["k"])


def test_loop_resets_abandoned_race_loser(impl):
    r = Run(impl, loop(race(sql("a"), sql("b")), sql("c"), name="l"))
    r.start()
    st = r.done("a")
    assert r.names(st.abandoned) == ["b"]
    assert r.s.status(r["b"]) == FAILED
    st = r.done("c")
    assert r.s.status(r["b"]) == RUNNING
    assert r.names(st.ready) == ["a", "b"]
    assert [g for _, g in st.ready] == [2, 2]
    # the first iteration's loser reports late: fenced off by its generation
    assert is_empty(r.s.complete(r["b"], 1, True, True))


# -- stopped composites (no node of an abandoned branch stays running) -----------------


def test_race_loser_loop_is_stopped(impl):
    # a LOOP on a RACE's losing side: its leaf is abandoned, the LOOP and the THEN in its
    # body are reported stopped, and every one of them is FAILED in the scheduler
    r = Run(impl, race(sql("w"), loop(then(sql("x"), sleep("s"), name="t"), name="l"), name="r"))
    r.start()
    r.done("x")
    st = r.done("w")
    assert r.names(st.abandoned) == ["s"]
    assert r.names(st.stopped) == ["l", "t"]  # ascending index
    assert [g for _, g in st.stopped] == [1, 1]
    assert r.fin(st) == [("w", COMPLETED, HOW_LEAF, []), ("r", COMPLETED, HOW_COPY, ["w"])]
    for name in ("l", "t", "s"):
        assert r.s.status(r[name]) == FAILED
    assert r.s.status(r["x"]) == COMPLETED


def test_race_loser_in_a_later_iteration_is_stopped_with_its_generation(impl):
    r = Run(
        impl, loop(race(sql("w"), then(sql("x"), sql("y"), name="t"), name="r"), sql("c"), name="l")
    )
    r.start()
    st = r.done("w")
    assert st.stopped == [(r["t"], 1)]
    st = r.done("c", truthy=True)  # iteration 2 re-activates the RACE and both branches
    assert r.s.status(r["t"]) == RUNNING
    assert r.s.gen(r["t"]) == 2
    st = r.done("w")
    assert st.stopped == [(r["t"], 2)]
    assert st.abandoned == [(r["x"], 2)]


def test_failed_join_stops_sibling_composites(impl):
    r = Run(impl, join(then(sql("a1"), sql("a2"), name="ta"), sql("b"), name="j"))
    r.start()
    st = r.done("b", ok=False)
    assert r.names(st.abandoned) == ["a1"]
    assert r.names(st.stopped) == ["ta"]


def test_break_stops_composites_of_other_branches(impl):
    body = join(then(sql("a"), brk("k")), then(sql("x"), sql("y"), name="tx"), name="j")
    r = Run(impl, loop(body, name="l"))
    r.start()
    r.done("a")
    st = r.done("k")
    assert r.names(st.stopped) == ["tx"]
    # the composites the break unwinds through are finished, not stopped
    assert [name for name, *_ in r.fin(st)] == ["k", None, "j", "l"]  # None: the THEN


def test_cancel_stops_every_running_composite(impl):
    r = Run(impl, join(sql("a"), then(sql("b"), sql("c"), name="t"), name="j"))
    r.start()
    r.done("b")
    st = r.s.cancel()
    assert r.names(st.abandoned) == ["a", "c"]
    assert r.names(st.stopped) == ["j", "t"]


def test_decided_if_rows_is_stopped_not_abandoned(impl):
    # decided: the executor no longer works on it, so it has no task to drop
    r = Run(impl, race(sql("w"), if_rows(sql("x"), sql("y"), name="i"), name="r"))
    r.start()
    r.s.complete(r["i"], 1, True, True)
    st = r.done("w")
    assert r.names(st.abandoned) == ["x"]
    assert r.names(st.stopped) == ["i"]


# -- generation fence, cancel, state ---------------------------------------------------


def test_stale_and_duplicate_completions_ignored(impl):
    r = Run(impl, loop(sql("b"), sql("c"), name="l"))
    r.start()
    b = r["b"]
    r.done("b")
    assert is_empty(r.s.complete(b, 1, True, True))  # duplicate: b completed
    r.done("c")
    assert r.s.gen(b) == 2
    assert is_empty(r.s.complete(b, 1, True, True))  # stale generation
    assert is_empty(r.s.complete(b, 3, True, True))  # future generation
    assert is_empty(r.s.complete(r["c"], 1, True, True))  # pending in this iteration
    st = r.s.complete(b, 2, True, True)
    assert r.names(st.ready) == ["c"]


def test_completion_after_terminal_ignored(impl):
    r = Run(impl, sql("a"))
    r.start()
    r.done("a")
    st = r.s.complete(0, 1, True, True)
    assert is_empty(st)
    assert st.terminal == T_COMPLETED


def test_cancel(impl):
    r = Run(impl, join(sql("a"), then(sql("b"), sql("c")), name="j"))
    r.start()
    r.done("b")
    st = r.s.cancel()
    assert r.names(st.abandoned) == ["a", "c"]
    assert st.finished == []
    assert st.terminal == T_CANCELLED == r.s.terminal
    assert r.s.status(r["j"]) == FAILED
    assert is_empty(r.done("a"))
    st = r.s.cancel()  # no-op once terminal
    assert is_empty(st)
    assert st.terminal == T_CANCELLED


def test_cancel_before_start(impl):
    r = Run(impl, sql("a"))
    st = r.s.cancel()
    assert st.terminal == T_CANCELLED
    with pytest.raises(RuntimeError, match="already started"):
        r.s.start()


def test_cancel_after_completion_is_noop(impl):
    r = Run(impl, sql("a"))
    r.start()
    r.done("a")
    assert r.s.cancel().terminal == T_COMPLETED


def _drive(r: Run, reload_every: int | None, impl) -> list[Step]:
    """Run a loop/join/race graph to the end, optionally through dump/load each step."""
    steps = [r.start()]
    order = ["a", "x", "c+", "z", "s", "a", "c+", "z", "a", "s", "c-", "k"]
    for i, name in enumerate(order):
        if reload_every and i % reload_every == 0:
            state = r.s.dump_state()
            r.s = impl.load_state(r.g, 100, state)
            assert r.s.dump_state() == state
        steps.append(r.done(name.rstrip("+-"), truthy=name.endswith("+")))
    return steps


def _reload_graph():
    body = then(join(sql("a"), race(sql("x"), sleep("s"))), if_(sql("c"), sql("z"), brk("k")))
    return loop(body, name="l")


def test_dump_load_round_trip_mid_run(impl):
    plain = _drive(Run(impl, _reload_graph()), None, impl)
    reloaded = _drive(Run(impl, _reload_graph()), 1, impl)
    assert plain == reloaded
    assert plain[-1].terminal == T_COMPLETED
    assert [st.iterations for st in plain if st.iterations] == [[(0, 2)], [(0, 3)]]


def test_dump_state_layout(impl):
    r = Run(impl, then(sql("a"), sql("b")))
    assert r.s.dump_state() == [1, 3, 0, 0] + [0] * 12
    r.start()
    assert r.s.dump_state() == [1, 3, 1, 0, 1, 1, 0, 1, 1, 0] + [0] * 6


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("x", "must be a list"),
        ([1, 1, 0], "has 3 ints, expected 8"),
        ([2, 1, 0, 0, 0, 0, 0, 0], "version 2"),
        ([1, 2, 0, 0, 0, 0, 0, 0], "for 2 nodes"),
        ([1, 1, 2, 0, 0, 0, 0, 0], "started flag"),
        ([1, 1, 0, 9, 0, 0, 0, 0], "terminal 9"),
        ([1, 1, 0, 0, 4, 0, 0, 0], r"status\[0\] = 4"),
        ([1, 1, 0, 0, 0, -1, 0, 0], r"gen\[0\] = -1"),
        ([1, 1, 0, 0, 0, 0, -1, 0], r"aux\[0\] = -1"),
        ([1, 1, 0, 0, 0, 0, 0, 2], r"truth\[0\] = 2"),
        ([1, 1, 0, 0, 0, 1.0, 0, 0], r"state\[5\] is not an int"),
        ([1, 1, 0, 0, 0, 1 << 70, 0, 0], r"gen\[0\]"),
    ],
)
def test_load_state_rejects_malformed(impl, state, message):
    g = compile_value(sql())
    with pytest.raises(ValueError, match=message):
        impl.load_state(g, 10, state)


# -- misuse ----------------------------------------------------------------------------


def test_start_twice(impl):
    r = Run(impl, sql("a"))
    r.start()
    with pytest.raises(RuntimeError, match="already started"):
        r.start()


def test_complete_before_start(impl):
    r = Run(impl, sql("a"))
    with pytest.raises(RuntimeError, match="not started"):
        r.s.complete(0, 1, True, True)


def test_complete_composite(impl):
    r = Run(impl, then(sql("a"), sql("b")))
    r.start()
    with pytest.raises(ValueError, match="node 0 is a THEN"):
        r.s.complete(0, 1, True, True)


@pytest.mark.parametrize("node", [-1, 3, 1 << 80])
def test_node_out_of_range(impl, node):
    r = Run(impl, then(sql("a"), sql("b")))
    r.start()
    for call in (
        lambda: r.s.complete(node, 1, True, True),
        lambda: r.s.status(node),
        lambda: r.s.gen(node),
        lambda: r.s.iteration(node),
    ):
        with pytest.raises(IndexError, match=f"node {node} out of range for a graph of 3"):
            call()


def test_iteration_of_non_loop(impl):
    r = Run(impl, then(sql("a"), sql("b")))
    with pytest.raises(ValueError, match="node 1 is a SQL, not a LOOP"):
        r.s.iteration(1)


def test_bad_max_iterations(impl):
    with pytest.raises(ValueError, match="max_iterations must be >= 1, got 0"):
        impl(compile_value(sql()), 0)


def test_selector_exports():
    from pgdurable.graph import sched

    assert sched.__impl__ in ("python", "cython")
    assert callable(sched.Scheduler)


@pytest.mark.parametrize("seed", range(60))
def test_every_node_that_stops_running_is_reported(impl, seed):
    """No node leaves RUNNING silently: each one that was running before a call and is not
    after it is in that call's ``finished``, ``abandoned`` or ``stopped`` (so the executor
    writes every such row; none stays running, D17). ``stopped`` holds composites only."""
    rnd = random.Random(seed)
    g = compile_value(random_graph(rnd, rnd.randint(3, 80)))
    n = len(g.types)
    s = impl(g, 3)

    def call(fn, *args):
        before = [s.status(i) for i in range(n)]
        step = fn(*args)
        reported = (
            {x for x, *_ in step.finished}
            | {x for x, _ in step.abandoned}
            | {x for x, _ in step.stopped}
        )
        for i in range(n):
            if before[i] == RUNNING and s.status(i) != RUNNING:
                assert i in reported, (seed, i, step)
        assert all(g.types[x] not in LEAF_TYPES for x, _ in step.stopped), step
        return step

    call(s.start)
    for _ in range(400):
        if s.terminal != T_RUNNING:
            break
        # what the executor works on: running leaves, if_rows IFs not yet decided (running
        # with nothing running below them), RETRYs waiting (running, their child failed)
        choices = [
            i
            for i in range(n)
            if s.status(i) == RUNNING
            and (
                g.types[i] in LEAF_TYPES
                or (
                    g.cond[i] == COND_IF_ROWS
                    and not any(s.status(j) == RUNNING for j in range(i + 1, g.end[i]))
                )
                or (g.types[i] == RETRY and s.status(g.left[i]) == FAILED)
            )
        ]
        assert choices, "a running instance with nothing to run"
        node = rnd.choice(choices)
        if rnd.random() < 0.01:
            call(s.cancel)
            break
        call(s.complete, node, s.gen(node), rnd.random() > 0.05, rnd.random() < 0.5)
