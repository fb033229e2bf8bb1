"""Peers in the same invocation (DESIGN §3): DBOS Transact and Procrastinate.

Both pip-install cleanly into the venv (``pip install -e '.[bench]'``: dbos 3.4.0,
procrastinate 3.10.0 at the time of writing), but their workload drivers are not
written yet: ``--peers dbos,procrastinate`` reports each as *not measured* rather
than quoting numbers from elsewhere. DESIGN §3's peer table (measured earlier on the
same kind of box) is what the results table's target column is derived from.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

KNOWN = {"dbos": "dbos", "procrastinate": "procrastinate"}


@dataclass
class PeerRow:
    """One peer x workload figure; ``steps_per_s`` 0 means not measured (see ``note``)."""

    peer: str
    workload: str
    steps_per_s: float = 0.0
    note: str = ""


def run(name: str, server: Any, args: Any, progress: Any) -> list[PeerRow]:
    module = KNOWN.get(name.lower())
    if module is None:
        return [PeerRow(name, "-", 0.0, f"unknown peer (known: {', '.join(KNOWN)})")]
    if importlib.util.find_spec(module) is None:
        return [PeerRow(name, "-", 0.0, "not installed (pip install -e '.[bench]')")]
    return [PeerRow(name, "W1–W3", 0.0, "installed, workload driver not written yet: "
                    "not measured")]
