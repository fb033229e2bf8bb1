"""Vars snapshots are shared between cached instances, not copied per instance (issue:
least privilege, memory): equal snapshots are one object, the table is bounded."""

from __future__ import annotations

from pgdurable.worker import instance


def test_equal_snapshots_share_one_dict() -> None:
    a = instance.shared_vars({"k": "v" * 1000, "n": "1"})
    b = instance.shared_vars({"n": "1", "k": "v" * 1000})  # same content, other order
    c = instance.shared_vars({"k": "other"})
    assert a is b
    assert a == {"k": "v" * 1000, "n": "1"}
    assert c is not a
    assert c == {"k": "other"}
    assert instance.shared_vars(None) == {}
    assert instance.shared_vars({}) == {}


def test_the_shared_table_is_bounded() -> None:
    for i in range(instance._VARS_SHARED_MAX * 3):
        instance.shared_vars({"i": str(i)})
    assert len(instance._VARS_SHARED) == instance._VARS_SHARED_MAX
    # the most recent stay
    last = {"i": str(instance._VARS_SHARED_MAX * 3 - 1)}
    assert instance.shared_vars(last) is instance.shared_vars(dict(last))
