# cython: language_level=3
"""Cython twin of ``pgdurable/graph/_sched_py.py``, compiled as ``pgdurable.graph._sched_c``.

It mirrors the Python twin function for function (same names, same order of
checks and effects) so the parity tests can compare them exactly; read the
Python module for the semantics and the reasoning. Differences are mechanical
only: the graph and the state live in C arrays allocated once per scheduler,
Python objects appear only in the output lists and at the API boundary.

Over 500 lines because it is the Python twin's size (one function for one function, so a
reviewer reads the two side by side); splitting it would split that correspondence.
"""

from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Malloc

from pgdurable.graph import _abc
from pgdurable.graph._abc import NODE_TYPE_CODES, Step

# the codes of _abc as C constants (checked against _abc at import, below)
cdef enum:
    SQL = 0
    THEN = 1
    IF_ = 2  # IF is a (legacy) Cython keyword
    LOOP = 3
    JOIN = 4
    RACE = 5
    BREAK = 6
    HTTP_MULTIPART = 11
    RETRY = 12
    FOREACH = 13
    NONE = -1
    COND_IF_ROWS = -2
    PENDING = 0
    RUNNING = 1
    COMPLETED = 2
    FAILED = 3
    T_RUNNING = 0
    T_COMPLETED = 1
    T_FAILED = 2
    T_CANCELLED = 3
    HOW_LEAF = 0
    HOW_COPY = 1
    HOW_ARRAY = 2
    HOW_FAIL = 3
    HOW_BREAK = 4
    HOW_ITERCAP = 5
    HOW_BREAK_OUTSIDE = 6

if ((_abc.SQL, _abc.THEN, getattr(_abc, "IF"), _abc.LOOP, _abc.JOIN, _abc.RACE, _abc.BREAK,
     _abc.HTTP_MULTIPART, _abc.RETRY, _abc.FOREACH, _abc.NONE, _abc.COND_IF_ROWS, _abc.FAILED,
     _abc.T_CANCELLED, _abc.HOW_BREAK_OUTSIDE)
        != (SQL, THEN, IF_, LOOP, JOIN, RACE, BREAK, HTTP_MULTIPART, RETRY, FOREACH, NONE,
            COND_IF_ROWS,
            FAILED, T_CANCELLED, HOW_BREAK_OUTSIDE)
        or _abc.LEAF_TYPES != frozenset(t for t in range(14)
                                        if t == SQL or BREAK <= t <= HTTP_MULTIPART
                                        or t == FOREACH)):
    raise ImportError("native/_sched_c.pyx is out of date with pgdurable/graph/_abc.py")

STATE_VERSION = 1
cdef int _HEADER = 4
_MAX_COUNTER = 1 << 62

_TYPE_NAMES = {code: name for name, code in NODE_TYPE_CODES.items()}


cdef inline bint _is_leaf(int t) noexcept:
    # SQL, BREAK..HTTP_MULTIPART and FOREACH (codes 0, 6-11 and 13), as _abc.LEAF_TYPES
    return t == SQL or (t >= BREAK and t <= HTTP_MULTIPART) or t == FOREACH


cdef inline bint _as_ll(object o, long long* out) except -1:
    """True and ``*out`` set when ``o`` is an exact int that fits a long long."""
    cdef int overflow = 0
    if type(o) is not int:
        return False
    out[0] = PyLong_AsLongLongAndOverflow(o, &overflow)
    return overflow == 0


cdef int* _int_array(Py_ssize_t n) except NULL:
    cdef int* p = <int*>PyMem_Malloc(n * sizeof(int))
    if p == NULL:
        raise MemoryError()
    return p


cdef long long* _ll_array(Py_ssize_t n) except NULL:
    cdef long long* p = <long long*>PyMem_Malloc(n * sizeof(long long))
    if p == NULL:
        raise MemoryError()
    return p


cdef class Scheduler:
    """One instance's scheduler over a CompiledGraph (see ``_sched_py.Scheduler``)."""

    cdef Py_ssize_t _n
    cdef long long _max_iterations
    cdef object _graph
    # the graph, copied into C arrays
    cdef int* _types
    cdef int* _left
    cdef int* _right
    cdef int* _cond
    cdef int* _extra
    cdef int* _parent
    cdef int* _end
    cdef long long* _attempts
    # the state
    cdef int* _status
    cdef long long* _gen
    cdef long long* _aux
    cdef int* _truth
    cdef int* _stack  # _activate's work stack: each node is pushed at most once per call
    cdef bint _started
    cdef int _terminal
    # output buffers of the call in progress
    cdef list _ready
    cdef list _abandoned
    cdef list _stopped
    cdef list _started_out
    cdef list _finished
    cdef list _iterations

    def __cinit__(self, *args, **kwargs):
        self._n = 0
        self._types = self._left = self._right = self._cond = NULL
        self._extra = self._parent = self._end = self._status = self._truth = NULL
        self._stack = NULL
        self._gen = self._aux = self._attempts = NULL

    def __dealloc__(self):
        PyMem_Free(self._types)
        PyMem_Free(self._left)
        PyMem_Free(self._right)
        PyMem_Free(self._cond)
        PyMem_Free(self._extra)
        PyMem_Free(self._parent)
        PyMem_Free(self._end)
        PyMem_Free(self._attempts)
        PyMem_Free(self._status)
        PyMem_Free(self._gen)
        PyMem_Free(self._aux)
        PyMem_Free(self._truth)
        PyMem_Free(self._stack)

    def __init__(self, graph, max_iterations):
        cdef Py_ssize_t n = len(graph.types)
        cdef Py_ssize_t i
        if n == 0:
            raise ValueError("graph has no nodes")
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
        if self._types != NULL:
            raise RuntimeError("Scheduler.__init__ called twice")
        self._graph = graph
        self._n = n
        self._max_iterations = min(max_iterations, _MAX_COUNTER)
        self._types = _int_array(n)
        self._left = _int_array(n)
        self._right = _int_array(n)
        self._cond = _int_array(n)
        self._extra = _int_array(n)
        self._parent = _int_array(n)
        self._end = _int_array(n)
        self._status = _int_array(n)
        self._truth = _int_array(n)
        self._stack = _int_array(n)
        self._gen = _ll_array(n)
        self._aux = _ll_array(n)
        self._attempts = _ll_array(n)
        cdef tuple attempts = tuple(graph.attempts)
        cdef tuple types = tuple(graph.types), left = tuple(graph.left)
        cdef tuple right = tuple(graph.right), cond = tuple(graph.cond)
        cdef tuple extra = tuple(graph.extra), parent = tuple(graph.parent)
        cdef tuple end = tuple(graph.end)
        for i in range(n):
            self._types[i] = types[i]
            self._left[i] = left[i]
            self._right[i] = right[i]
            self._cond[i] = cond[i]
            self._extra[i] = extra[i]
            self._parent[i] = parent[i]
            self._end[i] = end[i]
            self._attempts[i] = attempts[i]
            self._status[i] = PENDING
            self._gen[i] = 0
            self._aux[i] = 0
            self._truth[i] = 0
        self._started = False
        self._terminal = T_RUNNING
        self._reset_out()

    # -- output buffers of the call in progress ------------------------------------

    cdef void _reset_out(self):
        self._ready = []
        self._abandoned = []
        self._stopped = []
        self._started_out = []
        self._finished = []
        self._iterations = []

    cdef object _step(self):
        if len(self._ready) > 1:
            self._ready.sort()
        if len(self._abandoned) > 1:
            self._abandoned.sort()
        if len(self._stopped) > 1:
            self._stopped.sort()
        # tuple.__new__ skips the NamedTuple's Python-level __new__ (same object)
        step = tuple.__new__(Step, (self._ready, self._abandoned, self._started_out,
                                    self._finished, self._iterations, self._terminal,
                                    self._stopped))
        self._reset_out()
        return step

    # -- public API (SchedulerProto) -----------------------------------------------

    def start(self):
        """Activate the root; its leaves are the first ``ready``."""
        if self._started:
            raise RuntimeError("scheduler already started")
        self._started = True
        self._activate(0)
        return self._step()

    def complete(self, node, gen, ok, truthy):
        """Apply one leaf outcome (an if_rows IF decision, the end of a RETRY's wait); stale
        ones return an empty Step."""
        self._check_node(node)
        cdef Py_ssize_t i = node
        cdef int t = self._types[i]
        cdef bint if_rows = t == IF_ and self._cond[i] == COND_IF_ROWS
        cdef long long g
        if not _is_leaf(t) and not if_rows and t != RETRY:
            raise ValueError(f"node {node} is a {_TYPE_NAMES[t]}: only leaves, if_rows IF "
                             "decisions and RETRY waits are completed by the executor")
        if not self._started:
            raise RuntimeError("scheduler not started")
        if (self._terminal != T_RUNNING or self._status[i] != RUNNING
                or not (g == self._gen[i] if _as_ll(gen, &g) else gen == self._gen[i])
                or (if_rows and self._aux[i] != 0)
                or (t == RETRY and not self._waiting(i))):
            return self._step()
        if t == RETRY:
            if ok:
                self._next_attempt(i)
            else:
                self._finish(i, FAILED, HOW_FAIL, [self._left[i]])
                self._propagate(i)
            return self._step()
        if if_rows:
            if ok:
                self._take_arm(i, bool(truthy))
            else:
                self._finish(i, FAILED, HOW_LEAF, [])
                self._propagate(i)
            return self._step()
        if ok:
            self._status[i] = COMPLETED
            self._truth[i] = 1 if truthy else 0
            self._finished.append((i, COMPLETED, HOW_LEAF, []))
            if t == BREAK:
                self._break(i)
            else:
                self._propagate(i)
        else:
            self._finish(i, FAILED, HOW_LEAF, [])
            self._propagate(i)
        return self._step()

    def cancel(self):
        """Abandon every active leaf and end as T_CANCELLED (no-op once terminal)."""
        if self._terminal != T_RUNNING:
            return self._step()
        self._started = True
        self._abandon_range(0, self._n)
        self._terminal = T_CANCELLED
        return self._step()

    def status(self, node):
        self._check_node(node)
        return self._status[<Py_ssize_t>node]

    def gen(self, node):
        self._check_node(node)
        return self._gen[<Py_ssize_t>node]

    def iteration(self, loop):
        self._check_node(loop)
        cdef int t = self._types[<Py_ssize_t>loop]
        if t != LOOP and t != RETRY:
            raise ValueError(f"node {loop} is a {_TYPE_NAMES[t]}, not a LOOP or RETRY")
        return self._aux[<Py_ssize_t>loop]

    @property
    def terminal(self):
        return self._terminal

    def dump_state(self):
        """``[version, n, started, terminal] + status + gen + aux + truth``."""
        cdef Py_ssize_t i, n = self._n
        cdef list out = [STATE_VERSION, n, int(self._started), self._terminal]
        for i in range(n):
            out.append(self._status[i])
        for i in range(n):
            out.append(self._gen[i])
        for i in range(n):
            out.append(self._aux[i])
        for i in range(n):
            out.append(self._truth[i])
        return out

    @classmethod
    def load_state(cls, graph, max_iterations, state):
        """Rebuild from :meth:`dump_state`; ValueError names the malformed part."""
        cdef Scheduler self = cls(graph, max_iterations)
        cdef Py_ssize_t i, n = self._n, base = _HEADER
        _check_state(state, n)
        self._started = bool(state[2])
        self._terminal = state[3]
        for i in range(n):
            self._status[i] = state[base + i]
            self._gen[i] = state[base + n + i]
            self._aux[i] = state[base + 2 * n + i]
            self._truth[i] = state[base + 3 * n + i]
        return self

    # -- internals -----------------------------------------------------------------

    cdef int _check_node(self, node) except -1:
        cdef long long v
        if _as_ll(node, &v) and 0 <= v < self._n:
            return 0  # the common case, without Python comparisons
        if not 0 <= node < self._n:
            raise IndexError(f"node {node} out of range for a graph of {self._n} nodes")
        return 0

    cdef void _finish(self, int node, int status, int how, list sources):
        self._status[node] = status
        self._finished.append((node, status, how, sources))

    cdef void _activate(self, int node):
        cdef int* stack = self._stack
        cdef Py_ssize_t top = 0
        cdef int n, t, c
        stack[top] = node
        top += 1
        while top:
            top -= 1
            n = stack[top]
            self._status[n] = RUNNING
            self._gen[n] += 1
            self._started_out.append((n, self._gen[n]))
            t = self._types[n]
            if _is_leaf(t):
                self._ready.append((n, self._gen[n]))
            elif t == THEN:
                stack[top] = self._left[n]
                top += 1
            elif t == IF_:
                self._aux[n] = 0
                c = self._cond[n]
                if c == COND_IF_ROWS:
                    self._ready.append((n, self._gen[n]))
                else:
                    stack[top] = c
                    top += 1
            elif t == LOOP or t == RETRY:
                self._aux[n] = 1
                stack[top] = self._left[n]
                top += 1
            else:  # JOIN, RACE
                self._aux[n] = 0
                if self._extra[n] != NONE:
                    stack[top] = self._extra[n]
                    top += 1
                stack[top] = self._right[n]
                stack[top + 1] = self._left[n]
                top += 2

    cdef void _take_arm(self, int node, bint truthy):
        self._aux[node] = 1 if truthy else 2
        self._activate(self._left[node] if truthy else self._right[node])

    cdef void _abandon_range(self, Py_ssize_t lo, Py_ssize_t hi):
        cdef Py_ssize_t i
        cdef int t
        for i in range(lo, hi):
            if self._status[i] == RUNNING:
                self._status[i] = FAILED
                t = self._types[i]
                if (_is_leaf(t) or (t == IF_ and self._cond[i] == COND_IF_ROWS
                                    and self._aux[i] == 0)
                        or (t == RETRY and self._status[self._left[i]] == FAILED)):
                    self._abandoned.append((i, self._gen[i]))
                else:
                    self._stopped.append((i, self._gen[i]))

    cdef void _abandon_siblings(self, int node, int child):
        cdef int k, b
        for k in range(3):
            b = self._left[node] if k == 0 else (self._right[node] if k == 1
                                                 else self._extra[node])
            if b != NONE and b != child:
                self._abandon_range(b, self._end[b])

    cdef bint _iterate(self, int loop):
        cdef long long k = self._aux[loop] + 1
        cdef Py_ssize_t i
        if k > self._max_iterations:
            self._finish(loop, FAILED, HOW_ITERCAP, [])
            return False
        self._aux[loop] = k
        self._iterations.append((loop, k))
        for i in range(loop + 1, self._end[loop]):
            self._status[i] = PENDING
            self._aux[i] = 0
            self._truth[i] = 0
        self._activate(self._left[loop])
        return True

    cdef bint _waiting(self, int retry):
        return self._status[retry] == RUNNING and self._status[self._left[retry]] == FAILED

    cdef void _next_attempt(self, int retry):
        cdef long long k = self._aux[retry] + 1
        cdef Py_ssize_t i
        self._aux[retry] = k
        self._iterations.append((retry, k))
        for i in range(retry + 1, self._end[retry]):
            self._status[i] = PENDING
            self._aux[i] = 0
            self._truth[i] = 0
        self._activate(self._left[retry])

    cdef void _propagate(self, int child):
        self._propagate_from(child, HOW_FAIL, NONE)

    cdef void _propagate_from(self, int child, int fail_how, int fail_src):
        cdef int p, t, body
        cdef bint failed
        cdef list srcs
        while True:
            p = self._parent[child]
            if p == NONE:
                self._terminal = T_COMPLETED if self._status[child] == COMPLETED else T_FAILED
                return
            t = self._types[p]
            failed = self._status[child] == FAILED or fail_src != NONE
            if t == RACE:
                self._aux[p] = child + 1
                self._abandon_siblings(p, child)
            if (t == RETRY and failed and fail_src == NONE
                    and self._aux[p] < self._attempts[p]):
                self._ready.append((p, self._gen[p]))
                return
            if failed:
                if t == JOIN:
                    self._abandon_siblings(p, child)
                self._finish(p, FAILED, fail_how, [child if fail_src == NONE else fail_src])
                child = p
                continue
            if t == THEN:
                if child == self._left[p]:
                    self._activate(self._right[p])
                    return
                self._complete_copy(p, child)
            elif t == IF_:
                if child == self._cond[p]:
                    self._take_arm(p, self._truth[child] == 1)
                    return
                self._complete_copy(p, child)
            elif t == LOOP:
                body = self._left[p]
                if child == body and self._cond[p] != NONE:
                    self._activate(self._cond[p])
                    return
                if child == body or self._truth[child]:
                    if self._iterate(p):
                        return
                else:
                    self._complete_copy(p, body)
            elif t == RETRY:
                self._complete_copy(p, child)
            elif t == JOIN:
                self._aux[p] += 1
                if self._aux[p] < (2 if self._extra[p] == NONE else 3):
                    return
                srcs = [self._left[p], self._right[p]]
                if self._extra[p] != NONE:
                    srcs.append(self._extra[p])
                self._finish(p, COMPLETED, HOW_ARRAY, srcs)
                self._truth[p] = 1
            else:  # RACE, won
                self._complete_copy(p, child)
            child = p

    cdef void _complete_copy(self, int node, int src):
        self._finish(node, COMPLETED, HOW_COPY, [src])
        self._truth[node] = self._truth[src]

    cdef void _break(self, int brk):
        cdef int loop = self._parent[brk]
        cdef int child, p
        while loop != NONE and self._types[loop] != LOOP:
            loop = self._parent[loop]
        if loop == NONE:
            if self._parent[brk] == NONE:
                self._terminal = T_FAILED
            else:
                self._propagate_from(brk, HOW_BREAK_OUTSIDE, brk)
            return
        child = brk
        p = self._parent[brk]
        while p != loop:
            if self._types[p] == RACE:
                self._aux[p] = child + 1
            self._finish(p, COMPLETED, HOW_BREAK, [brk])
            self._truth[p] = self._truth[brk]
            child = p
            p = self._parent[p]
        self._abandon_range(loop + 1, self._end[loop])
        self._finish(loop, COMPLETED, HOW_BREAK, [brk])
        self._truth[loop] = self._truth[brk]
        self._propagate(loop)


def _check_state(state, Py_ssize_t n):
    """Validate a dump_state list for a graph of ``n`` nodes (as ``_sched_py._check_state``)."""
    if not isinstance(state, list):
        raise ValueError(f"state must be a list of ints, not {type(state).__name__}")
    expected = _HEADER + 4 * n
    if len(state) != expected:
        raise ValueError(f"state has {len(state)} ints, expected {expected} for {n} nodes")
    for i, v in enumerate(state):
        if type(v) is not int:
            raise ValueError(f"state[{i}] is not an int: {v!r}")
    if state[0] != STATE_VERSION:
        raise ValueError(f"state version {state[0]} is not {STATE_VERSION}")
    if state[1] != n:
        raise ValueError(f"state is for {state[1]} nodes, the graph has {n}")
    if state[2] not in (0, 1):
        raise ValueError(f"state started flag {state[2]} is not 0 or 1")
    if not T_RUNNING <= state[3] <= T_CANCELLED:
        raise ValueError(f"state terminal {state[3]} is not a terminal code")
    parts = ("status", "gen", "aux", "truth")
    for part, lo, hi in (("status", PENDING, FAILED), ("gen", 0, _MAX_COUNTER - 1),
                         ("aux", 0, _MAX_COUNTER - 1), ("truth", 0, 1)):
        base = _HEADER + parts.index(part) * n
        for i in range(n):
            v = state[base + i]
            if not lo <= v <= hi:
                raise ValueError(f"state {part}[{i}] = {v} is out of range")
