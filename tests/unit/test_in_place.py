"""Which failures of a batch's later step are its own to record in place
(pgdurable/worker/in_place.py): not the ones its neighbours in the batch may have caused."""

from __future__ import annotations

import psycopg
from psycopg import errors

from pgdurable.errors import StepError
from pgdurable.worker.in_place import own


def test_the_steps_own_errors_are_recorded_in_place():
    assert own(errors.DivisionByZero("x"))
    assert own(errors.UniqueViolation("x"))
    assert own(errors.QueryCanceled("x"))  # its own statement_timeout
    assert own(errors.ProgramLimitExceeded("x"))  # the runner's row cap
    assert own(StepError("step result is 1001 bytes, over the limit of 1000 bytes"))


def test_failures_the_neighbours_may_cause_roll_the_batch_back():
    # the batch's transaction holds the neighbours' locks, reads and writes
    assert not own(errors.DeadlockDetected("x"))
    assert not own(errors.SerializationFailure("x"))
    assert not own(errors.LockNotAvailable("x"))
    # no SQLSTATE (the connection), or the connection's class
    assert not own(psycopg.OperationalError("x"))
    assert not own(errors.ConnectionFailure("x"))
    assert not own(errors.AdminShutdown("x"))  # the server going away
    assert not own(errors.CrashShutdown("x"))
