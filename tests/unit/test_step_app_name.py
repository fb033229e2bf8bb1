"""The application_name a step's transaction sets (pgdurable:<instance>:<node>): within
NAMEDATALEN, printable ASCII only, whatever ids rows written by hand hold."""

from __future__ import annotations

import pytest

from pgdurable.worker.task import step_app_name

from .tasks import task


def test_ordinary_ids_appear_as_they_are():
    assert step_app_name(task("3fa2b1c4", "9d8e7f6a")) == "pgdurable:3fa2b1c4:9d8e7f6a"


@pytest.mark.parametrize(
    ("iid", "node"),
    [
        ("a\nb\x1b[31m", "n\x00\u202e"),
        ("é" * 80, "ü" * 80),
        ("x" * 500, "y" * 500),
        ("a:b", "c d"),
    ],
)
def test_hostile_ids_are_cleaned_and_bounded(iid, node):
    name = step_app_name(task(iid, node))
    assert len(name.encode()) <= 63
    assert name.startswith("pgdurable:")
    assert name.count(":") == 2  # a ':' in an id cannot shift the fields a DBA splits on
    assert all(c.isascii() and (c.isalnum() or c in "_-:?") for c in name), name
