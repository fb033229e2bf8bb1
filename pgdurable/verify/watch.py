"""The verifier's watch on serve: who holds the database's connections, and what serve's logs
say about takeovers.

:func:`holder_of` sorts a connection by its application_name into :data:`HOLDERS` (the soak
watch's table); :func:`log_evidence` counts, in serve's logs, the expired leases another
worker rescued (a stalled, stopped or cut worker's steps taken over) and the checkpoints
fenced (the late worker refused): what shows that the stall and partition faults did what
they are for.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from pathlib import Path

try:  # finds serve's worker processes; in the 'test' extra, not a runtime dependency
    import psutil  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover
    psutil = None

RESCUED_RE = re.compile(r"rescued (\d+) expired leases")

HOLDERS = (
    "running serve",
    "orphaned workers",
    "client gone",
    "supervisor heartbeat",
    "verify itself",
    "other",
)
"""Who holds a connection, from its application_name ("pgdurable worker/step <pid>", "pgdurable
listener <pid>", …): a worker of the serve now running, a worker still alive whose supervisor
was killed, a worker pid that no longer exists (the server has not noticed), the rest."""


def holder_of(app: str, current: set[int]) -> tuple[str, int | None]:
    """(holder, worker pid) of one connection; ``current``: the running serve's workers."""
    parts = app.split()
    if (
        len(parts) == 3
        and parts[0] == "pgdurable"
        and parts[1] in ("worker", "listener", "step")
        and parts[2].isdigit()
    ):
        pid = int(parts[2])
        if pid in current:
            return "running serve", pid
        alive = psutil is not None and psutil.pid_exists(pid)
        if alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        return ("orphaned workers" if alive else "client gone"), pid
    if app == "pgdurable supervisor":
        return "supervisor heartbeat", None
    if app == "pgdurable verify":
        return "verify itself", None
    return "other", None


def log_evidence(paths: list[Path]) -> Counter[str]:
    """Leases expired and rescued, steps fenced at checkpoint: counted in serve logs."""
    out: Counter[str] = Counter()
    for path in paths:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                m = RESCUED_RE.search(line)
                if m:
                    out["leases expired and rescued (logs)"] += int(m.group(1))
                elif "step fenced (" in line:
                    out["steps fenced at checkpoint (logs)"] += 1
    return out
