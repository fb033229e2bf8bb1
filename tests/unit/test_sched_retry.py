"""RETRY in the scheduler twins (``_abc`` docstring, "RETRY"), per implementation."""

from __future__ import annotations

import json

import pytest

from pgdurable.graph._abc import (
    COMPLETED,
    FAILED,
    HOW_BREAK,
    HOW_COPY,
    HOW_FAIL,
    HOW_LEAF,
    PENDING,
    RUNNING,
    T_CANCELLED,
    T_COMPLETED,
    T_FAILED,
    T_RUNNING,
)
from pgdurable.graph.compile import compile_value
from tests.graphs import brk, join, loop, race, retry, sleep, sql, then
from tests.unit.test_sched import Run


def test_success_first_time_copies_the_child(impl):
    r = Run(impl, retry(sql("a"), 3, name="r"))
    st = r.start()
    assert st.ready == [(r["a"], 1)]
    assert r.s.iteration(r["r"]) == 1
    st = r.done("a", truthy=False)
    assert r.fin(st) == [("a", COMPLETED, HOW_LEAF, []), ("r", COMPLETED, HOW_COPY, ["a"])]
    assert st.terminal == T_COMPLETED


def test_failure_waits_then_runs_again_with_a_new_generation(impl):
    r = Run(impl, then(retry(then(sql("a"), sql("b")), 3, name="r"), sql("c")))
    r.start()
    r.done("a")
    st = r.done("b", ok=False)
    # b fails, its THEN fails, the RETRY does not: it waits (reported ready, same gen)
    assert [x[0] for x in r.fin(st)] == ["b", None]
    assert st.ready == [(r["r"], 1)]
    assert st.terminal == T_RUNNING
    assert r.s.status(r["r"]) == RUNNING
    # a leaf completion of the failed attempt is fenced off; so is the RETRY's own, twice
    assert r.s.complete(r["b"], 1, True, True).finished == []
    st = r.s.complete(r["r"], 1, True, True)
    assert st.iterations == [(r["r"], 2)]
    assert st.ready == [(r["a"], 2)]  # the whole child again, a first
    assert r.s.status(r["b"]) == PENDING
    assert r.s.iteration(r["r"]) == 2
    assert r.s.complete(r["r"], 1, True, True) == r.s.complete(r["r"], 1, True, True)
    assert r.s.complete(r["r"], 1, True, True).ready == []
    r.done("a")
    st = r.done("b")
    assert ("r", COMPLETED, HOW_COPY, [None]) in r.fin(st)
    assert st.ready == [(r["c"], 1)]


def test_exhaustion_fails_with_the_child_failure(impl):
    r = Run(impl, retry(sql("a"), 2, name="r"))
    r.start()
    assert r.done("a", ok=False).ready == [(r["r"], 1)]
    r.s.complete(r["r"], 1, True, True)
    st = r.done("a", ok=False)
    assert r.fin(st) == [("a", FAILED, HOW_LEAF, []), ("r", FAILED, HOW_FAIL, ["a"])]
    assert st.terminal == T_FAILED
    assert st.ready == []


def test_max_attempts_one_never_waits(impl):
    r = Run(impl, retry(sql("a"), 1, name="r"))
    r.start()
    st = r.done("a", ok=False)
    assert st.terminal == T_FAILED
    assert st.ready == []


def test_giving_up_fails_at_once(impl):
    r = Run(impl, retry(sql("a"), 5, name="r"))
    r.start()
    r.done("a", ok=False)
    st = r.s.complete(r["r"], 1, False, False)
    assert r.fin(st) == [("r", FAILED, HOW_FAIL, ["a"])]
    assert st.terminal == T_FAILED


def test_a_waiting_retry_is_abandoned_with_its_branch_and_on_cancel(impl):
    r = Run(impl, join(retry(sql("a"), 3, name="r"), sql("b")))
    r.start()
    r.done("a", ok=False)
    st = r.done("b", ok=False)  # the JOIN fails: the waiting RETRY has a task to drop
    assert st.abandoned == [(r["r"], 1)]
    assert st.stopped == []
    r2 = Run(impl, retry(sql("a"), 3, name="r"))
    r2.start()
    r2.done("a", ok=False)
    st = r2.s.cancel()
    assert st.abandoned == [(r2["r"], 1)]
    assert st.terminal == T_CANCELLED
    # a running (not waiting) RETRY is a composite that stops with its branch
    r3 = Run(impl, race(retry(sql("a"), 3, name="r"), sql("b")))
    r3.start()
    st = r3.done("b")
    assert st.stopped == [(r3["r"], 1)]
    assert st.abandoned == [(r3["a"], 1)]


def test_break_through_a_retry_completes_it_and_is_not_retried_outside_a_loop(impl):
    r = Run(impl, loop(retry(then(sql("a"), brk("x")), 3, name="r"), name="l"))
    r.start()
    r.done("a")
    st = r.done("x")
    assert ("r", COMPLETED, HOW_BREAK, ["x"]) in r.fin(st)
    assert st.terminal == T_COMPLETED
    r2 = Run(impl, retry(then(sql("a"), brk("x")), 3, name="r"))
    r2.start()
    r2.done("a")
    st = r2.done("x")
    assert st.terminal == T_FAILED
    assert st.ready == []


def test_a_loop_iteration_resets_a_retry_inside_it(impl):
    r = Run(impl, loop(retry(sql("a"), 2, name="r"), sql("c")))
    r.start()
    r.done("a", ok=False)
    r.s.complete(r["r"], 1, True, True)
    assert r.s.iteration(r["r"]) == 2
    r.done("a")
    r.done("c", truthy=True)  # next iteration: the RETRY begins again at attempt 1
    assert r.s.iteration(r["r"]) == 1
    assert r.s.gen(r["r"]) == 2
    st = r.done("a", ok=False)
    assert st.ready == [(r["r"], 2)]  # a fresh attempt budget


def test_state_round_trip_while_waiting(impl):
    g = compile_value(retry(then(sleep("s"), sql("a")), 3, name="r"))
    s = impl(g, 10)
    s.start()
    s.complete(2, 1, True, True)
    s.complete(3, 1, False, False)
    t = impl.load_state(g, 10, s.dump_state())
    assert t.dump_state() == s.dump_state()
    st = t.complete(0, 1, True, True)
    assert st.ready == [(2, 2)]
    assert st.iterations == [(0, 2)]


def test_iteration_of_other_composites_is_an_error(impl):
    r = Run(impl, then(sql("a"), sql("b")))
    with pytest.raises(ValueError, match="not a LOOP or RETRY"):
        r.s.iteration(0)


@pytest.mark.parametrize(
    ("query", "what"),
    [
        (None, "max_attempts"),
        (json.dumps({"max_attempts": 0}), "max_attempts"),
        (json.dumps({"max_attempts": "3"}), "max_attempts"),
        (json.dumps({}), "max_attempts"),
    ],
)
def test_compile_refuses_a_bad_retry_config(query, what):
    with pytest.raises(ValueError, match=what):
        compile_value({"node_type": "RETRY", "query": query, "left_node": sql()})
    with pytest.raises(ValueError, match="no right_node"):
        compile_value(
            {
                "node_type": "RETRY",
                "query": '{"max_attempts": 2}',
                "left_node": sql(),
                "right_node": sql(),
            }
        )
